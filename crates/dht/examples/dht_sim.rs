//! DHT simulator: drives the sans-IO core with N virtual nodes in one
//! process (no sockets) and prints lookup hops and success rates with a
//! share of nodes silently gone.
//!
//! ```text
//! cargo run --release -p vx6-dht --example dht_sim -- --nodes 10000
//! options: --nodes N --lookups N --published N --value-lookups N
//!          --gone 0,10,30 --seed N --k N --alpha N --no-wire
//! ```
//! See `vx6_dht::sim` for what is modelled and how hops are counted.

use std::time::Instant;

use vx6_dht::sim::{SimConfig, run};

fn parse<T: std::str::FromStr>(flag: &str, v: Option<String>) -> T {
    match v.as_deref().map(str::parse) {
        Some(Ok(x)) => x,
        _ => {
            eprintln!("{flag} needs a valid value");
            std::process::exit(2)
        }
    }
}

fn main() {
    let mut cfg = SimConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--nodes" => cfg.nodes = parse(&a, args.next()),
            "--lookups" => cfg.lookups = parse(&a, args.next()),
            "--published" => cfg.published = parse(&a, args.next()),
            "--value-lookups" => cfg.value_lookups = parse(&a, args.next()),
            "--seed" => cfg.seed = parse(&a, args.next()),
            "--k" => cfg.dht.k = parse(&a, args.next()),
            "--alpha" => cfg.dht.alpha = parse(&a, args.next()),
            "--no-wire" => cfg.wire = false,
            "--gone" => {
                let s: String = parse(&a, args.next());
                cfg.gone_percent = s
                    .split(',')
                    .map(|p| parse(&a, Some(p.trim().to_string())))
                    .collect();
            }
            "-h" | "--help" => {
                println!(
                    "usage: dht_sim [--nodes N] [--lookups N] [--published N] [--value-lookups N] [--gone 0,10,30] [--seed N] [--k N] [--alpha N] [--no-wire]"
                );
                return;
            }
            other => {
                eprintln!("unknown argument {other}; try --help");
                std::process::exit(2)
            }
        }
    }
    let started = Instant::now();
    match run(&cfg) {
        Ok(report) => {
            print!("{report}");
            println!("\nwall time {:.1} s", started.elapsed().as_secs_f64());
        }
        Err(e) => {
            eprintln!("simulation failed: {e}");
            std::process::exit(1)
        }
    }
}
