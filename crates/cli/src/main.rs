//! The `vx6` command: argument parsing and output only.
//!
//! Local-only commands (`init`, `service add/remove/list`) edit the home's
//! files directly (atomically, under a lock) and tell a running daemon to
//! reload; everything else talks to the daemon over its control socket.

use std::process::ExitCode;

/// `println!` that ends the process quietly when stdout is gone (a closed
/// pipe, e.g. `vx6 status | head`) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;
use vx6_node::config::{self, Config};
use vx6_node::control::{Client, ConnectSpec, Request};
use vx6_node::home::Home;
use vx6_proto::NodeId;
use vx6_proto::name::{NodeName, ServiceName};
use vx6_proto::record::TransportKind;

#[derive(Parser)]
#[command(
    name = "vx6",
    version,
    about = "Reach localhost services on other machines by name, directly or through relays"
)]
struct Cli {
    /// The node's directory (config, identity, registry, control socket).
    #[arg(long, global = true, env = "VX6_HOME")]
    home: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create this node's identity and config.
    Init {
        #[arg(long)]
        name: String,
        /// Address to listen on (repeatable), e.g. '[::]:4242'.
        #[arg(long)]
        listen: Vec<String>,
        /// tcp, quic or both.
        #[arg(long, default_value = "both")]
        transport: String,
        /// An entry peer, e.g. '[2001:db8::7]:4242' (repeatable).
        #[arg(long)]
        peer: Vec<String>,
        /// Address to advertise instead of the derived ones (repeatable).
        #[arg(long)]
        advertise: Vec<String>,
    },
    /// Run the daemon in the foreground until SIGINT/SIGTERM.
    Node,
    /// Node id, name, endpoints, peers, services, forwards, counters.
    Status(JsonFlag),
    /// This node's id and name.
    Identity(JsonFlag),
    /// Re-read config.toml and services.toml without dropping forwards.
    Reload,
    /// Entry peers and the peer registry.
    #[command(subcommand)]
    Peer(PeerCmd),
    /// Services this node publishes.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Show what NODE.SERVICE resolves to and where the answer came from.
    Resolve {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Forward a local port to a remote service.
    Connect(ConnectArgs),
}

#[derive(Args)]
struct JsonFlag {
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum PeerCmd {
    /// Add an entry peer by address.
    Add { addr: String },
    /// List known peers.
    List(JsonFlag),
    /// Forget a pinned name or address so the next contact pins afresh.
    Forget { target: String },
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Publish a localhost target as NAME.
    Add {
        name: String,
        target: String,
        /// Keep it out of public records; only --allow'ed nodes learn of it.
        #[arg(long)]
        private: bool,
        /// Only these node ids may use it (repeatable).
        #[arg(long)]
        allow: Vec<String>,
        /// Allow a target that is not a loopback address.
        #[arg(long)]
        allow_remote_target: bool,
    },
    List(JsonFlag),
    Remove {
        name: String,
    },
}

#[derive(Args)]
struct ConnectArgs {
    /// NODE.SERVICE (e.g. alice.web).
    name: Option<String>,
    /// Local address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long)]
    listen: String,
    /// Direct mode: the owner's address, e.g. '[2001:db8::7]:4242'.
    #[arg(long)]
    addr: Option<String>,
    /// Direct mode: the service name on that node.
    #[arg(long)]
    service: Option<String>,
    /// Direct mode: the owner's expected node id.
    #[arg(long)]
    node: Option<String>,
    /// tcp or quic.
    #[arg(long)]
    transport: Option<String>,
    /// direct or relay.
    #[arg(long)]
    via: Option<String>,
    /// Relay hops.
    #[arg(long)]
    hops: Option<u8>,
    /// Leave the forward running in the daemon and return.
    #[arg(long)]
    detach: bool,
}

/// mimalloc, not glibc's malloc: channels and forwards hand 8–64 KiB
/// buffers from one thread to another, and glibc returns the freed pages to
/// the kernel and faults them in again on the next burst (a fifth of direct
/// mode's throughput in quick runs; docs/BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vx6: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vx6: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let home = Home::new(cli.home.clone().unwrap_or_else(Home::default_root));
    match cli.cmd {
        Cmd::Init {
            name,
            listen,
            transport,
            peer,
            advertise,
        } => init(&home, name, listen, transport, peer, advertise).await,
        Cmd::Node => run_node(home).await,
        Cmd::Status(j) => {
            let v = call(&home, Request::Status).await?;
            print_or(j.json, &v, print_status)
        }
        Cmd::Identity(j) => {
            let v = match call(&home, Request::Identity).await {
                Ok(v) => v,
                // Identity is readable without a daemon.
                Err(_) => {
                    let key = home.load_identity()?;
                    let cfg = Config::load(&home.config_path())?;
                    serde_json::json!({"node_id": key.node_id().to_string(), "short": key.node_id().short(), "name": cfg.name})
                }
            };
            print_or(j.json, &v, |v| {
                out!("{}  {}", s(&v["name"]), s(&v["node_id"]))
            })
        }
        Cmd::Reload => {
            call(&home, Request::Reload).await?;
            out!("reloaded");
            Ok(())
        }
        Cmd::Peer(PeerCmd::Add { addr }) => {
            let v = call(&home, Request::PeerAdd { addr: addr.clone() }).await?;
            match v.get("node").and_then(Value::as_str) {
                Some(n) => out!("added peer {addr} (node {n})"),
                None => out!("added peer {addr}"),
            }
            Ok(())
        }
        Cmd::Peer(PeerCmd::List(j)) => {
            let v = call(&home, Request::PeerList).await?;
            print_or(j.json, &v, |v| {
                for p in v["peers"].as_array().into_iter().flatten() {
                    out!(
                        "{:<28} {:<54} {}",
                        s(&p["addr"]),
                        s(&p["node"]),
                        s(&p["state"])
                    );
                }
            })
        }
        Cmd::Peer(PeerCmd::Forget { target }) => peer_forget(&home, &target).await,
        Cmd::Service(cmd) => service(&home, cmd).await,
        Cmd::Resolve { name, json } => {
            let v = call(&home, Request::Resolve { name }).await?;
            print_or(json, &v, |v| {
                out!(
                    "{} → node {} ({})",
                    s(&v["name"]),
                    s(&v["node"]),
                    s(&v["source"])
                );
                for e in v["endpoints"].as_array().into_iter().flatten() {
                    out!("  {}", s(e));
                }
            })
        }
        Cmd::Connect(a) => connect(&home, a).await,
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_or(json: bool, v: &Value, human: impl FnOnce(&Value)) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(v)?);
    } else {
        human(v);
    }
    Ok(())
}

fn print_status(v: &Value) {
    out!("node      {} ({})", s(&v["name"]), s(&v["node_id"]));
    for e in v["endpoints"].as_array().into_iter().flatten() {
        out!("endpoint  {}", s(e));
    }
    out!("peers     {}", v["peers"].as_array().map_or(0, Vec::len));
    for svc in v["services"].as_array().into_iter().flatten() {
        let vis = if svc["private"].as_bool() == Some(true) {
            "private"
        } else {
            "public"
        };
        out!(
            "service   {} → {} ({vis})",
            s(&svc["name"]),
            s(&svc["target"])
        );
    }
    for f in v["forwards"].as_array().into_iter().flatten() {
        out!(
            "forward   {} → {} ({} connections)",
            s(&f["listen"]),
            s(&f["to"]),
            s(&f["connections"])
        );
    }
}

async fn client(home: &Home) -> Result<Client> {
    Ok(Client::connect(&home.socket_path(), &home.root().display().to_string()).await?)
}

/// One request to the daemon; a refusal becomes an error with its message.
async fn call(home: &Home, req: Request) -> Result<Value> {
    let mut c = client(home).await?;
    let r = c.call(&req).await?;
    if r.ok {
        Ok(r.data)
    } else {
        Err(anyhow!(r.error.unwrap_or_else(|| "request failed".into())))
    }
}

async fn init(
    home: &Home,
    name: String,
    listen: Vec<String>,
    transport: String,
    peer: Vec<String>,
    advertise: Vec<String>,
) -> Result<()> {
    let name = NodeName::new(&name).map_err(|e| anyhow!("--name: {e}"))?;
    let mut cfg = Config::new(name.clone());
    if !listen.is_empty() {
        cfg.listen = listen
            .iter()
            .map(|a| parse_addr(a, "--listen"))
            .collect::<Result<_>>()?;
    }
    cfg.transports = match transport.as_str() {
        "both" => vec![TransportKind::Tcp, TransportKind::Quic],
        t => vec![
            t.parse::<TransportKind>()
                .map_err(|_| anyhow!("--transport: use tcp, quic or both"))?,
        ],
    };
    for p in &peer {
        parse_addr(p, "--peer")?;
    }
    cfg.peers = peer;
    cfg.advertise = advertise
        .iter()
        .map(|a| parse_addr(a, "--advertise"))
        .collect::<Result<_>>()?;
    let entry: Vec<std::net::SocketAddr> =
        cfg.peers.iter().filter_map(|p| p.parse().ok()).collect();
    let key = home.init(&cfg)?;
    out!("created node {} ({})", name, key.node_id());
    out!("home: {}", home.root().display());
    if !entry.is_empty() {
        match vx6_node::discovery::name_claimants(&key, &name, &entry).await {
            Some(others) if !others.is_empty() => {
                let ids: Vec<String> = others.iter().map(|i| i.to_string()).collect();
                eprintln!(
                    "warning: the name '{name}' is already claimed in the network by {}; clients will see a name clash and must pick a node by id prefix",
                    ids.join(", ")
                );
            }
            Some(_) => {}
            None => eprintln!(
                "note: no entry peer answered, so nobody checked whether the name '{name}' is taken; the node still joins through them when it starts"
            ),
        }
    }
    Ok(())
}

fn parse_addr(a: &str, flag: &str) -> Result<std::net::SocketAddr> {
    a.parse()
        .map_err(|_| anyhow!("{flag}: '{a}' is not an address: use [ipv6]:port or ipv4:port"))
}

async fn run_node(home: Home) -> Result<()> {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let level = std::env::var("VX6_LOG")
        .ok()
        .and_then(|l| l.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::INFO);
    let filter = Targets::new()
        .with_default(LevelFilter::WARN)
        .with_target("vx6", level);
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    let node = vx6_node::Node::start(home.clone()).await?;
    let eps: Vec<String> = node
        .local_endpoints()
        .iter()
        .map(|e| format!("{}/{}", e.transport, e.addr))
        .collect();
    out!(
        "node {} running; listening on {}",
        node.id(),
        eps.join(", ")
    );
    node.run_until_signal().await?;
    Ok(())
}

async fn service(home: &Home, cmd: ServiceCmd) -> Result<()> {
    match cmd {
        ServiceCmd::Add {
            name,
            target,
            private,
            allow,
            allow_remote_target,
        } => {
            let sname = ServiceName::new(&name).map_err(|e| anyhow!("service name: {e}"))?;
            let target = parse_addr(&target, "TARGET")?;
            if !target.ip().is_loopback() && !allow_remote_target {
                bail!(
                    "target {target} is not a loopback address; VX6 publishes local services only (pass --allow-remote-target to publish another host's port on purpose)"
                );
            }
            if target.port() == 0 {
                bail!("target {target} has port 0");
            }
            let mut ids = Vec::new();
            for a in &allow {
                ids.push(
                    a.parse::<NodeId>()
                        .map_err(|e| anyhow!("--allow '{a}': {e}"))?
                        .to_string(),
                );
            }
            home.load_identity().context("cannot add a service")?;
            config::edit_services(home, |s| {
                s.service.insert(
                    sname.to_string(),
                    config::ServiceEntry {
                        target,
                        private,
                        allow: ids.clone(),
                        allow_remote_target,
                    },
                );
                Ok(())
            })?;
            let cfg = Config::load(&home.config_path())?;
            if private {
                out!(
                    "service {sname} → {target} added (private; allowed: {})",
                    if ids.is_empty() {
                        "nobody yet: add --allow NODEID".to_string()
                    } else {
                        ids.len().to_string()
                    }
                );
            } else {
                out!(
                    "service {sname} → {target} added (public: {}.{sname})",
                    cfg.name
                );
            }
            reload_if_running(home).await
        }
        ServiceCmd::List(j) => {
            let s_ = config::load_services(home)?;
            let v = serde_json::to_value(&s_.service)?;
            print_or(j.json, &v, |_| {
                for (n, e) in &s_.service {
                    let vis = if e.private { "private" } else { "public" };
                    out!(
                        "{n:<16} {:<24} {vis}{}",
                        e.target,
                        if e.allow.is_empty() {
                            String::new()
                        } else {
                            format!(" allow={}", e.allow.len())
                        }
                    );
                }
            })
        }
        ServiceCmd::Remove { name } => {
            let removed = config::edit_services(home, |s| {
                Ok(s.service.remove(&name.to_ascii_lowercase()).is_some())
            })?;
            if !removed {
                bail!("no service named '{name}'");
            }
            out!("service {name} removed");
            reload_if_running(home).await
        }
    }
}

async fn reload_if_running(home: &Home) -> Result<()> {
    if let Ok(mut c) = client(home).await {
        let r = c.call(&Request::Reload).await?;
        if !r.ok {
            bail!(
                "saved, but the running node could not reload: {}",
                r.error.unwrap_or_default()
            );
        }
    }
    Ok(())
}

async fn peer_forget(home: &Home, target: &str) -> Result<()> {
    let t = target.to_ascii_lowercase();
    let removed = config::edit_pins(home, |p| {
        let a = p.addrs.remove(&t).is_some() || p.addrs.remove(target).is_some();
        let n = p.names.remove(&t).is_some();
        Ok(a || n)
    })?;
    if !removed {
        bail!("nothing pinned for '{target}'");
    }
    out!("forgot the pin for {target}; the next contact pins afresh");
    Ok(())
}

async fn connect(home: &Home, a: ConnectArgs) -> Result<()> {
    let spec = ConnectSpec {
        name: a.name,
        addr: a.addr,
        service: a.service,
        listen: a.listen,
        node: a.node,
        transport: a.transport,
        via: a.via,
        hops: a.hops,
        detach: a.detach,
    };
    let mut c = client(home).await?;
    let r = c.call(&Request::Connect(spec)).await?;
    if !r.ok {
        bail!(r.error.unwrap_or_else(|| "connect failed".into()));
    }
    let v = r.data;
    if v["pinned"].as_bool() == Some(true) {
        eprintln!(
            "first contact: pinned node id {} for this address",
            s(&v["node"])
        );
    }
    out!(
        "forwarding {} → {}.{} (node {}, via {})",
        s(&v["listen"]),
        short(&v["node"]),
        s(&v["service"]),
        s(&v["node"]),
        s(&v["via"])
    );
    if let Some(path) = v["path"].as_array() {
        // Relay mode: the hops of the circuit, the owner last (short ids).
        let hops: Vec<String> = path.iter().map(s).collect();
        out!("path: {}", hops.join(" → "));
    }
    if a.detach {
        out!("detached: forward id {}", s(&v["id"]));
        return Ok(());
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = c.wait_closed() => bail!("the node stopped; forward closed"),
    }
    Ok(())
}

fn short(v: &Value) -> String {
    let mut s = s(v);
    s.truncate(12);
    s
}
