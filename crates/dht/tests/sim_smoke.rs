//! CI-sized run of the DHT simulator (the 10,000-node numbers are in
//! docs/BENCHMARKS.md).

use vx6_dht::sim::{SimConfig, run};

#[test]
fn five_hundred_nodes_find_each_other_with_and_without_churn() {
    let cfg = SimConfig {
        nodes: 500,
        lookups: 400,
        published: 40,
        value_lookups: 100,
        gone_percent: vec![0, 30],
        ..SimConfig::default()
    };
    let report = run(&cfg).unwrap();
    println!("{report}");
    assert_eq!(report.stores_rejected, 0);
    for p in &report.phases {
        assert!(
            p.success_rate() >= 0.99,
            "{}% gone: success {}",
            p.gone_percent,
            p.success_rate()
        );
        assert!(
            p.hops_median <= 4,
            "{}% gone: median hops {}",
            p.gone_percent,
            p.hops_median
        );
        assert!(
            p.value_success_rate() >= 0.99,
            "{}% gone: value success {}",
            p.gone_percent,
            p.value_success_rate()
        );
    }
    let calm = &report.phases[0];
    assert!(calm.success_rate() >= 0.999);
    assert!(
        calm.k_closest_recall >= 0.95,
        "recall {}",
        calm.k_closest_recall
    );
}
