fn main() {
    std::process::exit(handgrad::cli::main());
}

/// mimalloc keeps freed memory for reuse instead of returning large blocks to the kernel after
/// every call, which removed page-fault and TLB-shootdown churn from the training step; large
/// blocks start on a cache line (`util::alloc`).
#[global_allocator]
static GLOBAL: handgrad::util::alloc::LineAligned = handgrad::util::alloc::LineAligned;
