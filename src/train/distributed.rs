//! Data-parallel training across processes (`mpirun -np N handgrad train ...`).
//!
//! Every rank holds the whole model and runs the same optimizer update; only the gradient
//! differs, and it is summed across ranks before clipping and AdamW, so every rank applies the
//! identical update to identical weights. The data of an update is defined per *global* step:
//! each micro-batch is `batch x ranks` windows drawn from one seeded stream, and rank `r` trains
//! on windows `r * batch .. (r + 1) * batch` of it (the others are drawn and skipped, which costs
//! a random number each). So 2 ranks x batch B see exactly the windows of 1 rank x batch 2B, and
//! the sampler state saved in a checkpoint means the same thing for any number of ranks.
//!
//! [`Collective`] is the little the trainer needs from MPI; [`Single`] is the one-process case.
//! The MPI implementation (cargo feature `mpi`, the `mpi` crate over the system's MPI) is
//! chosen when the process was started by an MPI launcher or with `--distributed mpi`.

use crate::error::{Error, Result};

/// Sums across ranks, in place.
pub trait Collective: Send + Sync {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Replaces `xs` on every rank by the elementwise sum over all ranks.
    fn sum_f32(&self, xs: &mut [f32]) -> Result<()>;
    /// As [`Collective::sum_f32`], for f64 (losses, flags).
    fn sum_f64(&self, xs: &mut [f64]) -> Result<()>;
    /// All-gather: `recv` (`size x send.len()`) receives every rank's `send`, rank 0's first,
    /// on every rank (bf16 gradients travel as their bits).
    fn gather_u16(&self, send: &[u16], recv: &mut [u16]) -> Result<()>;
    /// Sends `xs` to rank `to`, which receives it with [`Collective::receive_f32`].
    fn send_f32(&self, to: usize, xs: &[f32]) -> Result<()>;
    /// Receives into `out` what rank `from` sent with [`Collective::send_f32`] (as many
    /// values as `out` holds).
    fn receive_f32(&self, from: usize, out: &mut [f32]) -> Result<()>;
    /// Ends every rank of the job at once (after an error on one rank, the others would wait
    /// for it forever).
    fn abort(&self, code: i32) -> !;
    /// What runs the collectives, in words.
    fn describe(&self) -> String;
}

/// One process: sums are the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn gather_u16(&self, send: &[u16], recv: &mut [u16]) -> Result<()> {
        if send.len() != recv.len() {
            return Err(Error::invalid("all-gather buffers of different sizes"));
        }
        recv.copy_from_slice(send);
        Ok(())
    }
    fn send_f32(&self, _: usize, _: &[f32]) -> Result<()> {
        Err(Error::invalid("one process has no other rank to send to"))
    }
    fn receive_f32(&self, _: usize, _: &mut [f32]) -> Result<()> {
        Err(Error::invalid(
            "one process has no other rank to receive from",
        ))
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn describe(&self) -> String {
        "one process".into()
    }
}

/// Environment variables MPI launchers set in the processes they start (Open MPI, MPICH /
/// Hydra, PMIx, Slurm's srun with PMI).
const LAUNCHER_SIZE_VARS: &[&str] = &["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"];

/// The number of ranks an MPI launcher started, if this process was started by one.
pub fn launcher_size() -> Option<usize> {
    LAUNCHER_SIZE_VARS
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// Ranks of this job on this machine (for the default thread count), when the launcher says.
pub fn local_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
        .filter(|&n: &usize| n > 0)
}

/// How `train` decides whether it is one rank of a distributed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Distributed {
    /// MPI when an MPI launcher started the process (mpirun / mpiexec / srun), else none.
    #[default]
    Auto,
    /// One process, even under an MPI launcher.
    None,
    /// MPI (an error when this handgrad was built without the `mpi` feature).
    Mpi,
}

/// What the ranks of a job exchange.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum DistributedMode {
    /// Every update: the gradients are summed across the ranks, and every rank applies the
    /// same update (exactly one process's with the whole batch).
    #[default]
    DataParallel,
    /// DiLoCo (local SGD): each rank runs AdamW on its own data for --sync-every updates; then
    /// the ranks average how far their weights moved and take one outer Nesterov step
    /// (--outer-lr, --outer-momentum). The ranks talk once every H updates.
    Diloco,
}

/// How gradients (and DiLoCo's weight deltas) travel between ranks.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum GradComm {
    /// f32, summed by MPI.
    #[default]
    F32,
    /// Rounded to bf16 (8 significant bits) for the transfer, summed in f32: half the bytes
    /// with 2 ranks.
    Bf16,
}

impl std::fmt::Display for DistributedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DistributedMode::DataParallel => "data-parallel",
            DistributedMode::Diloco => "diloco",
        })
    }
}

impl std::fmt::Display for GradComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GradComm::F32 => "f32",
            GradComm::Bf16 => "bf16",
        })
    }
}

/// The collective for this process: MPI when asked for or launched by MPI, else [`Single`].
pub fn connect(mode: Distributed) -> Result<Box<dyn Collective>> {
    let launched = launcher_size();
    let want_mpi = match mode {
        Distributed::None => false,
        Distributed::Mpi => true,
        Distributed::Auto => launched.is_some_and(|n| n > 1),
    };
    if !want_mpi {
        return Ok(Box::new(Single));
    }
    mpi_backend::connect()
}

#[cfg(feature = "mpi")]
mod mpi_backend {
    use std::sync::Mutex;

    use mpi::collective::SystemOperation;
    use mpi::environment::{Threading, Universe};
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;

    use super::Collective;
    use crate::error::{Error, Result};

    /// Elements per allreduce call: large sums go in buckets of 16 MB, so the receive buffer
    /// stays small and the transfer pipelines.
    const BUCKET: usize = 4 << 20;

    struct Comm {
        _universe: Universe,
        world: SimpleCommunicator,
        recv32: Vec<f32>,
        recv64: Vec<f64>,
    }

    /// MPI's world communicator. Every call takes the mutex, so MPI is entered by one thread
    /// at a time (MPI initialised with `MPI_THREAD_SERIALIZED`).
    pub struct MpiCollective {
        comm: Mutex<Comm>,
        rank: usize,
        size: usize,
        library: String,
    }

    // SAFETY: MPI was initialised with at least `Threading::Serialized`, which allows calls
    // from any thread as long as no two run at once; every use of the communicator goes
    // through the mutex.
    unsafe impl Send for MpiCollective {}
    // SAFETY: as above.
    unsafe impl Sync for MpiCollective {}

    pub fn connect() -> Result<Box<dyn Collective>> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| Error::invalid("MPI is already initialised in this process"))?;
        if level < Threading::Serialized {
            return Err(Error::invalid(format!(
                "the MPI library offers thread level {level:?}; handgrad needs Serialized"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let library = mpi::environment::library_version()
            .unwrap_or_else(|_| "MPI".into())
            // Open MPI's string carries its C terminator.
            .replace('\0', "")
            .lines()
            .next()
            .unwrap_or("MPI")
            .trim()
            .to_string();
        Ok(Box::new(MpiCollective {
            comm: Mutex::new(Comm {
                _universe: universe,
                world,
                recv32: Vec::new(),
                recv64: Vec::new(),
            }),
            rank,
            size,
            library,
        }))
    }

    impl MpiCollective {
        fn lock(&self) -> Result<std::sync::MutexGuard<'_, Comm>> {
            self.comm
                .lock()
                .map_err(|_| Error::invalid("the MPI communicator was poisoned by a panic"))
        }

        /// `rank` as MPI's rank type, checked against the job's size.
        fn peer(&self, rank: usize) -> Result<i32> {
            if rank >= self.size || rank == self.rank {
                return Err(Error::invalid(format!(
                    "rank {} cannot exchange with rank {rank} of {}",
                    self.rank, self.size
                )));
            }
            Ok(rank as i32)
        }
    }

    impl Collective for MpiCollective {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn sum_f32(&self, xs: &mut [f32]) -> Result<()> {
            let mut c = self.lock()?;
            let Comm { world, recv32, .. } = &mut *c;
            for chunk in xs.chunks_mut(BUCKET) {
                recv32.resize(chunk.len(), 0.0);
                world.all_reduce_into(&*chunk, &mut recv32[..], SystemOperation::sum());
                chunk.copy_from_slice(recv32);
            }
            Ok(())
        }
        fn sum_f64(&self, xs: &mut [f64]) -> Result<()> {
            let mut c = self.lock()?;
            let Comm { world, recv64, .. } = &mut *c;
            recv64.resize(xs.len(), 0.0);
            world.all_reduce_into(&*xs, &mut recv64[..], SystemOperation::sum());
            xs.copy_from_slice(recv64);
            Ok(())
        }
        fn gather_u16(&self, send: &[u16], recv: &mut [u16]) -> Result<()> {
            if recv.len() != send.len() * self.size {
                return Err(Error::invalid(
                    "all-gather receive buffer is not ranks x the send buffer",
                ));
            }
            let c = self.lock()?;
            c.world.all_gather_into(send, recv);
            Ok(())
        }
        fn send_f32(&self, to: usize, xs: &[f32]) -> Result<()> {
            let c = self.lock()?;
            let dest = c.world.process_at_rank(self.peer(to)?);
            for chunk in xs.chunks(BUCKET) {
                dest.send(chunk);
            }
            Ok(())
        }
        fn receive_f32(&self, from: usize, out: &mut [f32]) -> Result<()> {
            let c = self.lock()?;
            let source = c.world.process_at_rank(self.peer(from)?);
            for chunk in out.chunks_mut(BUCKET) {
                let status = source.receive_into(chunk);
                let got = status.count(f32::equivalent_datatype()) as usize;
                if got != chunk.len() {
                    return Err(Error::invalid(format!(
                        "rank {from} sent {got} values where {} were expected",
                        chunk.len()
                    )));
                }
            }
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            match self.comm.lock() {
                Ok(c) => c.world.abort(code),
                Err(_) => std::process::exit(code),
            }
        }
        fn describe(&self) -> String {
            format!("MPI, {} ranks ({})", self.size, self.library)
        }
    }
}

#[cfg(not(feature = "mpi"))]
mod mpi_backend {
    use super::Collective;
    use crate::error::{Error, Result};

    pub fn connect() -> Result<Box<dyn Collective>> {
        Err(Error::invalid(
            "this handgrad was built without MPI: rebuild with `cargo build --release --features mpi` \
             (Debian: apt-get install libopenmpi-dev openmpi-bin libclang-dev), or pass --distributed none",
        ))
    }
}

/// The per-rank batch and accumulation that keep a run's global batch (`batch x accum x
/// ranks` sequences per update) when it continues on `ranks` ranks: the batch stays, the
/// accumulation absorbs the change. An error when no whole number of micro-batches does.
pub fn rescale_accum(
    batch: usize,
    accum: usize,
    saved_ranks: usize,
    ranks: usize,
) -> Result<usize> {
    let global = batch * accum * saved_ranks.max(1);
    let per = batch * ranks;
    if per == 0 || !global.is_multiple_of(per) {
        return Err(Error::invalid(format!(
            "the run was trained on {saved_ranks} rank(s) with {global} sequences per update; \
             {ranks} rank(s) x --batch {batch} cannot make that a whole number of micro-batches"
        )));
    }
    Ok(global / per)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_global_batch_is_kept_across_rank_counts() {
        assert_eq!(rescale_accum(4, 1, 2, 1).unwrap(), 2);
        assert_eq!(rescale_accum(4, 2, 1, 2).unwrap(), 1);
        assert_eq!(rescale_accum(4, 1, 1, 1).unwrap(), 1);
        let e = rescale_accum(4, 1, 1, 2).unwrap_err().to_string();
        assert!(e.contains("cannot make that a whole number"), "{e}");
    }

    #[test]
    fn a_single_process_sums_to_itself() {
        let mut x = [1.0f32, 2.0];
        Single.sum_f32(&mut x).unwrap();
        assert_eq!(x, [1.0, 2.0]);
        assert_eq!((Single.rank(), Single.size()), (0, 1));
    }
}
