//! `vx6-bench`: one run measures, on loopback,
//!
//! - bulk throughput and connect→first-byte latency of plain TCP, a plain
//!   userspace forward, VX6 direct mode over TCP and over QUIC, and `ssh -L`
//!   when sshd is installed — as ratios to plain TCP (issue 2);
//! - cold name-resolution latency on a 20-node network of real nodes, with the
//!   DHT simulator's hop counts (issue 3);
//! - VX6 relay mode through 3 relays, as ratios to direct mode, and its
//!   circuit setup time (issue 4).
//!
//! Everything runs in this process with temporary node homes. Progress goes
//! to stderr; the report (Markdown) to stdout.
//!
//! ```text
//! cargo run --release -p vx6-bench               # full run (1 GiB per transfer)
//! cargo run --release -p vx6-bench -- --quick    # 64 MiB, fewer samples
//! ```

mod direct;
mod nodes;
mod resolve;
mod ssh;
mod stats;
mod traffic;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "vx6-bench", version, about = "VX6 benchmarks on loopback")]
struct Args {
    /// Bytes per bulk transfer, per case and direction (e.g. 1GiB, 256MiB,
    /// 1000000). Default 1 GiB, or 64 MiB with --quick.
    #[arg(long, value_parser = parse_size)]
    bytes: Option<u64>,
    /// A short run: 64 MiB transfers, fewer samples and clients, a
    /// 1,000-node simulator.
    #[arg(long)]
    quick: bool,
    /// Rounds; each round measures every case once (throughput is the median).
    #[arg(long)]
    rounds: Option<usize>,
    /// Connect→first-byte samples per case, spread over the rounds.
    #[arg(long)]
    samples: Option<usize>,
    /// Extra relay forwards opened per transport to sample circuit setup
    /// time (default 20, 5 with --quick).
    #[arg(long)]
    circuit_samples: Option<usize>,
    /// Measure only these cases (plain, proxy, vx6-tcp, vx6-quic, relay-tcp,
    /// relay-quic, ssh).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Skip the throughput/latency benchmark.
    #[arg(long)]
    no_direct: bool,
    /// Skip ssh -L even when sshd is installed.
    #[arg(long)]
    no_ssh: bool,
    /// Skip the name-resolution benchmark.
    #[arg(long)]
    no_resolve: bool,
    /// Skip the DHT simulator.
    #[arg(long)]
    no_sim: bool,
    /// Nodes in the resolution network.
    #[arg(long, default_value_t = 20)]
    net_nodes: usize,
    /// Fresh clients that each join and resolve once.
    #[arg(long)]
    fresh_clients: Option<usize>,
    /// Clients that resolve a late owner through the DHT.
    #[arg(long)]
    dht_clients: Option<usize>,
    /// Virtual nodes in the DHT simulator.
    #[arg(long)]
    sim_nodes: Option<usize>,
    /// Seed for entry choices in the resolution network.
    #[arg(long, default_value_t = 0x5eed_0002)]
    seed: u64,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size such as 1GiB or 64MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit '{other}': use KiB, MiB or GiB")),
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("'{s}' is not a usable size"))
}

/// The allocator of the `vx6` binary (crates/cli/src/main.rs), so the
/// nodes in this process behave as daemons do.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let args = Args::parse();
    let q = args.quick;
    let bytes = args.bytes.unwrap_or(if q { 64 << 20 } else { 1 << 30 });
    if bytes < 1 << 20 {
        bail!("--bytes must be at least 1 MiB");
    }
    let started = Instant::now();
    println!("# vx6-bench");
    println!();
    println!("- machine: {}", stats::machine());
    println!(
        "- command: vx6-bench {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    println!("- load average at start: {}", stats::load_average());
    println!();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot build the runtime")?;

    if !args.no_direct {
        eprintln!("direct mode: starting target, forwards and nodes…");
        let opts = direct::Options {
            bytes,
            rounds: args.rounds.unwrap_or(3),
            samples: args.samples.unwrap_or(if q { 300 } else { 2000 }),
            only: args.only.clone(),
            ssh: !args.no_ssh,
            circuit_samples: args.circuit_samples.unwrap_or(if q { 5 } else { 20 }),
        };
        let report = rt.block_on(direct::run(&opts))?;
        println!("## Direct mode: throughput and connect→first byte");
        println!();
        println!("{report}");
        drop(report);
    }

    if !args.no_resolve {
        let opts = resolve::Options {
            nodes: args.net_nodes,
            fresh: args.fresh_clients.unwrap_or(if q { 10 } else { 30 }),
            dht_clients: args.dht_clients.unwrap_or(if q { 6 } else { 15 }),
            seed: args.seed,
        };
        let report = rt.block_on(resolve::run(&opts))?;
        println!("## Name resolution");
        println!();
        println!("{report}");
    }
    // Stop every node's background work before the CPU-bound simulator.
    rt.shutdown_timeout(Duration::from_secs(5));

    if !args.no_sim {
        let cfg = vx6_dht::sim::SimConfig {
            nodes: args.sim_nodes.unwrap_or(if q { 1_000 } else { 10_000 }),
            lookups: if q { 1_000 } else { 5_000 },
            ..Default::default()
        };
        eprintln!("DHT simulator: {} virtual nodes…", cfg.nodes);
        let t0 = Instant::now();
        let report = vx6_dht::sim::run(&cfg).context("the DHT simulator failed")?;
        println!(
            "## DHT simulator (lookup hops), {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        println!();
        println!("{report}");
    }
    println!(
        "- load average at end: {}; total {:.0} s",
        stats::load_average(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("1TB").is_err());
    }
}
