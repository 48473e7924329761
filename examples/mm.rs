fn main() {
    let cfg = handgrad::model::ModelConfig::preset("stories110m").unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        let (p, isa) = handgrad::bench::peak::fp32_peak(1.0);
        println!(
            "fp32 peak {p:.1} GFLOP/s ({isa}); bf16 {:?}",
            handgrad::bench::peak::bf16_peak(1.0)
        );
        for r in handgrad::bench::matmul::run(&handgrad::backend::cpu::CpuKernels, &cfg, 1024, 3) {
            println!(
                "{:28} {:6} {:5}x{:5}x{:5} {:8.2} ms {:7.1} GFLOP/s",
                r.weight, r.pass, r.m, r.k, r.n, r.ms, r.gflops
            );
        }
    });
}
