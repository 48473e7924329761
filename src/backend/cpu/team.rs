//! A team of worker threads for short parallel regions.
//!
//! Decoding a token runs about five parallel regions per layer (the q/k/v products, attention,
//! o_proj, gate/up, down), each lasting tens of microseconds. Rayon's idle workers go to sleep
//! after a few dozen rounds of yielding, and waking them costs a futex call and, in a virtual
//! machine, an interrupt between cores: measured here at 15-75 µs per region (4 tasks of 10 µs
//! on 2 threads took 42 µs back to back and 74 µs more than the work when 100 µs of serial
//! work separated the regions), several milliseconds per token. The workers of this team spin
//! on an atomic counter between regions instead (up to [`SPIN`], as OpenMP runtimes do by
//! default), so a region starts within a cache-line transfer; after that they sleep on a
//! condition variable and cost nothing.
//!
//! The team has `rayon::current_num_threads() - 1` workers (one team per thread count, made on
//! first use); the calling thread takes tasks too. A region started from inside another (a
//! task that runs a region) or while another thread's region is running runs its tasks on the
//! calling thread, in order.

use std::cell::Cell;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_millis(2);

/// One region: the tasks and the function that runs one of them.
struct Job<'a> {
    tasks: usize,
    run: &'a (dyn Fn(usize) + Sync),
}

/// State shared by the caller and the workers of a team.
struct Shared {
    /// Incremented when a region is published.
    epoch: AtomicUsize,
    /// The current region (null between regions). Lives on the caller's stack: the caller
    /// clears it and waits until no worker holds it before returning.
    job: AtomicPtr<Job<'static>>,
    /// The next task to hand out.
    next: AtomicUsize,
    /// Tasks finished.
    done: AtomicUsize,
    /// Workers between reading `job` and letting go of it.
    holding: AtomicUsize,
    /// Workers asleep (or about to be) on `wake`.
    sleeping: AtomicUsize,
    /// The payload of the first task of the current region that panicked.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    lock: Mutex<()>,
    wake: Condvar,
}

/// A team of `workers` spinning threads.
struct Team {
    shared: Arc<Shared>,
    /// One region at a time.
    busy: Mutex<()>,
}

thread_local! {
    /// Whether this thread is running a task of a region (a nested region runs inline).
    static IN_REGION: Cell<bool> = const { Cell::new(false) };
}

impl Team {
    fn new(workers: usize) -> Team {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            holding: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            panic: Mutex::new(None),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        for i in 0..workers {
            let s = Arc::clone(&shared);
            // A worker that cannot be started leaves the team smaller: the tasks still run
            // (the caller takes every task no worker takes).
            let _ = std::thread::Builder::new()
                .name(format!("handgrad-team-{i}"))
                .spawn(move || worker(&s));
        }
        Team {
            shared,
            busy: Mutex::new(()),
        }
    }

    /// Runs `run(0..tasks)` on the team and the calling thread.
    fn run(&self, tasks: usize, run: &(dyn Fn(usize) + Sync)) {
        // A poisoned lock only means an earlier region's caller unwound while holding it.
        let guard = match self.busy.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return inline(tasks, run),
        };
        let s = &*self.shared;
        let job = Job { tasks, run };
        s.next.store(0, Ordering::Relaxed);
        s.done.store(0, Ordering::Relaxed);
        // SAFETY: the pointer is published only until this function returns: below, `job` is
        // cleared and no worker holds it any more before `job` goes out of scope. The
        // lifetime is erased to store it in the shared slot.
        let ptr = unsafe {
            std::mem::transmute::<*const Job<'_>, *mut Job<'static>>(&job as *const Job<'_>)
        };
        s.job.store(ptr, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleeping.load(Ordering::SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        take_tasks(s, &job);
        while s.done.load(Ordering::Acquire) < tasks {
            std::hint::spin_loop();
        }
        s.job.store(std::ptr::null_mut(), Ordering::SeqCst);
        while s.holding.load(Ordering::SeqCst) > 0 {
            std::hint::spin_loop();
        }
        let payload = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(guard);
        if let Some(p) = payload {
            std::panic::resume_unwind(p);
        }
    }
}

/// Runs the tasks of a region on this thread, in order.
fn inline(tasks: usize, run: &(dyn Fn(usize) + Sync)) {
    (0..tasks).for_each(run);
}

/// Takes tasks of `job` until none is left.
fn take_tasks(s: &Shared, job: &Job) {
    let was = IN_REGION.with(|f| f.replace(true));
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.tasks {
            break;
        }
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (job.run)(i))) {
            let mut first = s.panic.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                *first = Some(p);
            }
        }
        s.done.fetch_add(1, Ordering::Release);
    }
    IN_REGION.with(|f| f.set(was));
}

/// A worker: waits for a new region (spinning, then sleeping), takes its tasks, repeats.
fn worker(s: &Shared) {
    let mut seen = s.epoch.load(Ordering::SeqCst);
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        while s.epoch.load(Ordering::Acquire) == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                let mut l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleeping.fetch_add(1, Ordering::SeqCst);
                while s.epoch.load(Ordering::SeqCst) == seen {
                    l = s.wake.wait(l).unwrap_or_else(|e| e.into_inner());
                }
                s.sleeping.fetch_sub(1, Ordering::SeqCst);
            }
        }
        seen = s.epoch.load(Ordering::Acquire);
        s.holding.fetch_add(1, Ordering::SeqCst);
        let ptr = s.job.load(Ordering::SeqCst);
        if !ptr.is_null() {
            // SAFETY: `ptr` was read after `holding` was raised and was not yet cleared, so
            // the caller of `Team::run` is still waiting (it clears `job`, then waits for
            // `holding` to fall to 0) and the job on its stack is alive.
            take_tasks(s, unsafe { &*ptr });
        }
        s.holding.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The team for `threads` threads in all (made on first use, kept for the process).
fn team(threads: usize) -> Option<&'static Team> {
    static TEAMS: OnceLock<Mutex<Vec<(usize, &'static Team)>>> = OnceLock::new();
    thread_local! {
        static CACHED: Cell<Option<(usize, &'static Team)>> = const { Cell::new(None) };
    }
    if threads <= 1 {
        return None;
    }
    if let Some((n, t)) = CACHED.with(Cell::get)
        && n == threads
    {
        return Some(t);
    }
    let mut teams = TEAMS
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let t = match teams.iter().find(|(n, _)| *n == threads) {
        Some(&(_, t)) => t,
        None => {
            let t: &'static Team = Box::leak(Box::new(Team::new(threads - 1)));
            teams.push((threads, t));
            t
        }
    };
    CACHED.with(|c| c.set(Some((threads, t))));
    Some(t)
}

/// Runs `run(i)` for every `i < tasks`, spread over `rayon::current_num_threads()` threads
/// (the caller's included); returns when all have finished. Tasks are handed out in order
/// from a shared counter. A panic in a task is raised again here (with its payload) once the
/// others finished.
pub fn for_each(tasks: usize, run: impl Fn(usize) + Sync) {
    if tasks <= 1 || IN_REGION.with(Cell::get) {
        return inline(tasks, &run);
    }
    match team(rayon::current_num_threads()) {
        Some(t) => t.run(tasks, &run),
        None => inline(tasks, &run),
    }
}

/// A raw pointer that may cross threads (the chunks it reaches are disjoint).
struct Base<T>(*mut T);
impl<T> Clone for Base<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Base<T> {}
// SAFETY: only used by `for_each_chunk_mut`, whose tasks touch disjoint chunks of a `&mut
// [T]` with `T: Send`.
unsafe impl<T: Send> Send for Base<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Base<T> {}

/// Runs `run(i, chunk)` for the consecutive chunks of `chunk` elements of `data` (the last may
/// be shorter), in parallel as [`for_each`].
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    run: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk = chunk.max(1);
    let len = data.len();
    let base = Base(data.as_mut_ptr());
    for_each(len.div_ceil(chunk), |i| {
        let start = i * chunk;
        let n = chunk.min(len - start);
        let b = base;
        // SAFETY: chunk `i` is `start..start + n` of `data`, inside it and disjoint from every
        // other task's chunk; `data` is borrowed mutably for the whole region.
        let part = unsafe { std::slice::from_raw_parts_mut(b.0.add(start), n) };
        run(i, part);
    });
}

/// `run(i)` for every `i < tasks`, in parallel as [`for_each`], collected in order.
pub fn map<R: Send>(tasks: usize, run: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let mut out: Vec<Option<R>> = (0..tasks).map(|_| None).collect();
    for_each_chunk_mut(&mut out, 1, |i, slot| slot[0] = Some(run(i)));
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_on_any_thread_count() {
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                for tasks in [0, 1, 2, 7, 100] {
                    let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                    for_each(tasks, |i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    });
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                }
                let mut data: Vec<usize> = vec![0; 1001];
                for_each_chunk_mut(&mut data, 64, |i, c| {
                    for (j, x) in c.iter_mut().enumerate() {
                        *x = i * 64 + j;
                    }
                });
                assert!(data.iter().enumerate().all(|(i, &x)| i == x));
                assert_eq!(map(5, |i| i * i), vec![0, 1, 4, 9, 16]);
            });
        }
    }

    #[test]
    fn nested_and_concurrent_regions_finish() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let total = AtomicUsize::new(0);
            // Regions started from rayon tasks at the same time, and regions inside tasks.
            rayon::scope(|sc| {
                for _ in 0..4 {
                    sc.spawn(|_| {
                        for_each(8, |_| {
                            for_each(3, |_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    });
                }
            });
            assert_eq!(total.load(Ordering::Relaxed), 4 * 8 * 3);
        });
    }

    #[test]
    fn a_panicking_task_is_reported_to_the_caller() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let r = std::panic::catch_unwind(|| {
                for_each(16, |i| {
                    if i == 9 {
                        panic!("task 9");
                    }
                })
            });
            let payload = r.unwrap_err();
            assert_eq!(payload.downcast_ref::<&str>(), Some(&"task 9"));
            // The team still works afterwards, on both threads.
            assert_eq!(map(4, |i| i + 1), vec![1, 2, 3, 4]);
            let threads: std::collections::HashSet<_> = (0..200)
                .flat_map(|_| {
                    map(8, |_| {
                        std::thread::sleep(std::time::Duration::from_micros(200));
                        std::thread::current().id()
                    })
                })
                .collect();
            assert!(
                threads.len() >= 2,
                "after a panic every region ran on one thread"
            );
        });
    }

    #[test]
    fn regions_after_the_workers_slept_still_run() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            assert_eq!(map(3, |i| i), vec![0, 1, 2]);
            std::thread::sleep(SPIN * 3);
            assert_eq!(map(3, |i| i), vec![0, 1, 2]);
        });
    }
}
