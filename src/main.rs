fn main() {
    std::process::exit(handgrad::cli::main());
}

/// mimalloc keeps freed memory for reuse instead of returning large blocks to the kernel after
/// every call, which removed page-fault and TLB-shootdown churn from the training step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
