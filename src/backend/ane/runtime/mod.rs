//! The Neural Engine runtime: compiling emitted MIL in memory through Apple's private
//! `AppleNeuralEngine` framework, binding IOSurfaces, evaluating, and cleaning up.
//!
//! Everything that can be written without the device is here and tested on Linux: the call
//! sequence ([`LoadedProgram`]), the platform's traps (binding order, surface sizes, status
//! checks, cleanup on every error path), the per-process compile budget ([`CompileBudget`]).
//! The device itself sits behind [`AnePlatform`], a thin one-to-one image of the private API.
//! Two implementations: [`apple::ApplePlatform`] (the real framework, resolved with `dlopen`
//! at run time, so this module builds on every OS and fails on Linux with one clear error) and
//! [`fake::FakePlatform`] (records every call, enforces the traps as the hardware is reported
//! to, and evaluates programs with handgrad's MIL simulator — `--backend ane-fake`).

pub mod apple;
pub mod fake;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::ane::mil::ProgramFiles;
use crate::error::{Error, Result};

/// An object the platform owns (a model, a surface, a request).
pub type Handle = u64;

/// What a platform call reports on failure: the `NSError` description, or why it could not
/// be made.
pub type PlatformResult<T> = std::result::Result<T, String>;

/// The quality of service every call uses (the value the original and Core ML use).
pub const QOS: u32 = 21;

/// Surfaces smaller than this fail at evaluate on the hardware (e.g. `[768, 16]` fp16 =
/// 24 KB fails): every surface is allocated at least this large.
pub const MIN_SURFACE_BYTES: usize = 48 * 1024;

/// The private API, one method per call (or per short fixed sequence of calls) of the
/// original's runtime. Implementations do no policy: ordering, padding, budgets and cleanup
/// are [`LoadedProgram`]'s.
pub trait AnePlatform: Send {
    /// For messages: "AppleNeuralEngine.framework", "fake".
    fn name(&self) -> &str;
    /// `+[_ANEInMemoryModelDescriptor modelWithMILText:weights:optionsPlist:]` with the MIL
    /// as UTF-8 `NSData` and a weights dictionary (`path -> {offset: 0, data}`; an empty
    /// dictionary when there are none, never nil), then
    /// `+[_ANEInMemoryModel inMemoryModelWithDescriptor:]`.
    fn create_model(
        &mut self,
        mil_utf8: &[u8],
        weights: &[(String, Vec<u8>)],
    ) -> PlatformResult<Handle>;
    /// `-[_ANEInMemoryModel hexStringIdentifier]`: the name of the model's folder in the
    /// temporary directory.
    fn model_identifier(&mut self, model: Handle) -> PlatformResult<String>;
    /// Foundation's `NSTemporaryDirectory()`: where the framework looks for the model's
    /// folder (not `$TMPDIR`, which differs under sudo, launchd or `env -i`).
    fn temporary_directory(&mut self) -> PlatformResult<PathBuf>;
    /// `-compileWithQoS:options:error:`.
    fn compile(&mut self, model: Handle) -> PlatformResult<()>;
    /// `-loadWithQoS:options:error:`.
    fn load(&mut self, model: Handle) -> PlatformResult<()>;
    /// `-unloadWithQoS:error:`.
    fn unload(&mut self, model: Handle) -> PlatformResult<()>;
    fn release_model(&mut self, model: Handle);
    /// `IOSurfaceCreate` (width = bytes, height 1, 1 byte per element, allocation = bytes)
    /// wrapped by `+[_ANEIOSurfaceObject objectWithIOSurface:]`.
    fn create_surface(&mut self, bytes: usize) -> PlatformResult<Handle>;
    fn release_surface(&mut self, surface: Handle);
    /// Lock, copy `data` to the start of the surface, unlock.
    fn write_surface(&mut self, surface: Handle, data: &[u8]) -> PlatformResult<()>;
    /// Lock, copy `data` as rows of `rows.row_len` bytes to `rows.offset + i * rows.stride`,
    /// unlock (a block of columns of every channel of a `[1, C, 1, W]` surface).
    fn write_surface_rows(
        &mut self,
        surface: Handle,
        rows: RowWrite,
        data: &[u8],
    ) -> PlatformResult<()>;
    /// Lock read-only, copy the start of the surface into `out`, unlock.
    fn read_surface(&mut self, surface: Handle, out: &mut [u8]) -> PlatformResult<()>;
    /// `+[_ANERequest requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:nil
    /// perfStats:nil procedureIndex:@0]`, indices 0..n in the order given.
    fn create_request(&mut self, inputs: &[Handle], outputs: &[Handle]) -> PlatformResult<Handle>;
    fn release_request(&mut self, request: Handle);
    /// `-evaluateWithQoS:options:request:error:`; its BOOL and error are checked.
    fn evaluate(&mut self, model: Handle, request: Handle) -> PlatformResult<()>;
}

/// Where a strided write puts its rows: row `i` of `row_len` bytes at `offset + i * stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowWrite {
    pub offset: usize,
    pub row_len: usize,
    pub stride: usize,
}

impl RowWrite {
    /// Checks that `data_len` bytes of whole rows fit a surface of `bytes`.
    pub fn check(&self, data_len: usize, bytes: usize) -> PlatformResult<()> {
        if self.row_len == 0 || !data_len.is_multiple_of(self.row_len) || self.stride < self.row_len
        {
            return Err(format!(
                "a write of {data_len} bytes in rows of {} every {} bytes is malformed",
                self.row_len, self.stride
            ));
        }
        let rows = data_len / self.row_len;
        let end = match rows {
            0 => 0,
            n => self.offset + (n - 1) * self.stride + self.row_len,
        };
        if end > bytes {
            return Err(format!(
                "{rows} rows of {} bytes from byte {} do not fit a {bytes}-byte surface",
                self.row_len, self.offset
            ));
        }
        Ok(())
    }
}

/// The step of loading a program that failed, for reports (`ane selftest`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Making the in-memory model and its folder.
    Create,
    Compile,
    Load,
    /// Creating its surfaces and request.
    Bind,
}

/// A platform shared by the kernels of a backend.
pub type SharedPlatform = Arc<Mutex<Box<dyn AnePlatform>>>;

fn lock(p: &SharedPlatform) -> MutexGuard<'_, Box<dyn AnePlatform>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Compiles this process has made, against the limit the compiler's leak imposes (it fails
/// or the process becomes unstable after about 119).
pub struct CompileBudget {
    used: AtomicUsize,
    limit: AtomicUsize,
}

/// The default limit: the original's static trainer stopped at 100 of the ~119.
pub const DEFAULT_COMPILE_BUDGET: usize = 100;
/// Overrides the limit of [`COMPILE_BUDGET`].
pub const COMPILE_BUDGET_VAR: &str = "HANDGRAD_ANE_COMPILE_BUDGET";
/// Test hook: compiles counted as already made when the process starts (as a long-lived
/// process would have); a restarted process does not inherit it.
pub const COMPILES_USED_VAR: &str = "HANDGRAD_ANE_COMPILES_USED";

/// The process's budget (the leak is per process), read from the environment on first use.
pub static COMPILE_BUDGET: CompileBudget = CompileBudget {
    used: AtomicUsize::new(usize::MAX),
    limit: AtomicUsize::new(0),
};

fn env_count(var: &str) -> Option<usize> {
    std::env::var(var).ok().and_then(|v| v.trim().parse().ok())
}

impl CompileBudget {
    /// A budget for tests.
    pub const fn new(limit: usize) -> Self {
        CompileBudget {
            used: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
        }
    }

    pub fn used(&self) -> usize {
        let u = self.used.load(Ordering::SeqCst);
        if u != usize::MAX {
            return u;
        }
        let start = env_count(COMPILES_USED_VAR).unwrap_or(0);
        match self
            .used
            .compare_exchange(usize::MAX, start, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => start,
            Err(now) => now,
        }
    }

    pub fn limit(&self) -> usize {
        let l = self.limit.load(Ordering::SeqCst);
        if l != 0 {
            return l;
        }
        let from_env = env_count(COMPILE_BUDGET_VAR)
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_COMPILE_BUDGET);
        match self
            .limit
            .compare_exchange(0, from_env, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => from_env,
            Err(now) => now,
        }
    }

    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit.max(1), Ordering::SeqCst);
    }

    /// Reserves `n` compiles for a whole kernel set, or says that the process must restart
    /// first: a set is compiled completely or not at all.
    pub fn reserve(&self, n: usize) -> Result<()> {
        let limit = self.limit();
        let mut used = self.used();
        loop {
            if used.checked_add(n).is_none_or(|total| total > limit) {
                return Err(Error::AneCompileBudget {
                    used,
                    needed: n,
                    limit,
                });
            }
            match self
                .used
                .compare_exchange(used, used + n, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }
}

/// One surface binding: the MIL name of an input or output and the bytes it holds.
#[derive(Debug, Clone)]
pub struct Binding {
    pub name: String,
    pub bytes: usize,
}

/// One group of input surfaces with the request that binds them (and the program's output
/// surfaces): a program keeps one per layer, so each layer's weights stay in its own surfaces
/// and are written once per optimizer update.
struct BindingSet {
    /// Input surfaces in binding (alphabetical) order, with the caller's index.
    inputs: Vec<(usize, Handle)>,
    request: Handle,
}

/// A compiled, loaded program with its surfaces and requests, built once and evaluated many
/// times. Dropping it unloads and releases everything, in reverse order of creation.
pub struct LoadedProgram {
    platform: SharedPlatform,
    model: Handle,
    loaded: bool,
    /// Binding set 0 is made with the program; [`LoadedProgram::add_set`] makes more.
    sets: Vec<BindingSet>,
    /// Output surfaces (shared by every set) in binding order, with the caller's index.
    outputs: Vec<(usize, Handle)>,
    input_bytes: Vec<usize>,
    output_bytes: Vec<usize>,
    input_names: Vec<String>,
    folder: Option<PathBuf>,
    name: String,
}

fn err(name: &str, platform: &str, what: &str, why: String) -> Error {
    Error::backend("ane", format!("{name}: {what} failed ({platform}): {why}"))
}

impl LoadedProgram {
    /// Compiles and loads `files` (one compile of `budget`, which the caller has reserved),
    /// and binds surfaces for `inputs` and `outputs` (in the program's declaration order).
    ///
    /// The traps: the hardware binds several inputs (or outputs) in alphabetical order of
    /// their MIL names, so they are sorted here and the caller's order is kept by index;
    /// every input surface (and every output surface) is allocated at the same size, at least
    /// [`MIN_SURFACE_BYTES`]; every status is checked and the `NSError` text reported; on any
    /// error what was created is released.
    pub fn new(
        platform: &SharedPlatform,
        name: &str,
        files: &ProgramFiles,
        inputs: &[Binding],
        outputs: &[Binding],
    ) -> Result<Self> {
        Self::new_staged(platform, name, files, inputs, outputs).map_err(|(_, e)| e)
    }

    /// [`LoadedProgram::new`], saying at which step a failure happened.
    pub fn new_staged(
        platform: &SharedPlatform,
        name: &str,
        files: &ProgramFiles,
        inputs: &[Binding],
        outputs: &[Binding],
    ) -> std::result::Result<Self, (Stage, Error)> {
        let mut p = LoadedProgram {
            platform: platform.clone(),
            model: 0,
            loaded: false,
            sets: Vec::new(),
            outputs: Vec::new(),
            input_bytes: inputs.iter().map(|b| b.bytes).collect(),
            output_bytes: outputs.iter().map(|b| b.bytes).collect(),
            input_names: inputs.iter().map(|b| b.name.clone()).collect(),
            folder: None,
            name: name.to_string(),
        };
        // On an error below, dropping `p` releases what exists so far.
        let mut guard = lock(platform);
        let pname = guard.name().to_string();
        let create = |e| (Stage::Create, e);
        p.model = guard
            .create_model(files.text.as_bytes(), &files.blobs)
            .map_err(|e| create(err(name, &pname, "creating the in-memory model", e)))?;
        let hex = guard
            .model_identifier(p.model)
            .map_err(|e| create(err(name, &pname, "reading the model identifier", e)))?;
        if hex.is_empty() || hex.contains(['/', '\\']) || hex.contains("..") {
            return Err(create(err(
                name,
                &pname,
                "reading the model identifier",
                format!("unexpected identifier {hex:?}"),
            )));
        }
        // The identifier may come from the program's content: identical programs share the
        // folder, which goes when its last user does.
        let tmp = guard
            .temporary_directory()
            .map_err(|e| create(err(name, &pname, "asking for the temporary directory", e)))?;
        let folder = tmp.join(&hex);
        folder_users(&folder, 1);
        p.folder = Some(folder.clone());
        write_model_folder(&folder, files)
            .map_err(|e| create(err(name, &pname, "writing the model folder", e.to_string())))?;
        guard
            .compile(p.model)
            .map_err(|e| (Stage::Compile, err(name, &pname, "compile", e)))?;
        // The original's bridge retries a failed load once after 100 ms.
        if let Err(first) = guard.load(p.model) {
            std::thread::sleep(std::time::Duration::from_millis(100));
            guard.load(p.model).map_err(|e| {
                (
                    Stage::Load,
                    err(name, &pname, "load", format!("{e} (first try: {first})")),
                )
            })?;
        }
        p.loaded = true;
        let out_alloc = surface_alloc(outputs);
        for i in binding_order(outputs) {
            let s = guard
                .create_surface(out_alloc)
                .map_err(|e| (Stage::Bind, err(name, &pname, "creating a surface", e)))?;
            p.outputs.push((i, s));
        }
        drop(guard);
        p.add_set().map_err(|e| (Stage::Bind, e))?;
        Ok(p)
    }

    /// A new set of input surfaces bound to the program by a request of its own; returns its
    /// index (set 0 exists from the start).
    pub fn add_set(&mut self) -> Result<usize> {
        let mut g = lock(&self.platform);
        let pname = g.name().to_string();
        let name = self.name.clone();
        let bindings: Vec<Binding> = self
            .input_names
            .iter()
            .zip(&self.input_bytes)
            .map(|(n, &bytes)| Binding {
                name: n.clone(),
                bytes,
            })
            .collect();
        let alloc = surface_alloc(&bindings);
        let mut inputs: Vec<(usize, Handle)> = Vec::new();
        let release = |g: &mut MutexGuard<'_, Box<dyn AnePlatform>>, inputs: &[(usize, Handle)]| {
            for &(_, s) in inputs.iter().rev() {
                g.release_surface(s);
            }
        };
        for i in binding_order(&bindings) {
            match g.create_surface(alloc) {
                Ok(s) => inputs.push((i, s)),
                Err(e) => {
                    release(&mut g, &inputs);
                    return Err(err(&name, &pname, "creating a surface", e));
                }
            }
        }
        let ins: Vec<Handle> = inputs.iter().map(|x| x.1).collect();
        let outs: Vec<Handle> = self.outputs.iter().map(|x| x.1).collect();
        match g.create_request(&ins, &outs) {
            Ok(request) => {
                self.sets.push(BindingSet { inputs, request });
                Ok(self.sets.len() - 1)
            }
            Err(e) => {
                release(&mut g, &inputs);
                Err(err(&name, &pname, "building the request", e))
            }
        }
    }

    /// Binding sets made so far.
    pub fn sets(&self) -> usize {
        self.sets.len()
    }

    fn set(&self, set: usize) -> Result<&BindingSet> {
        self.sets
            .get(set)
            .ok_or_else(|| Error::backend("ane", format!("{}: no binding set {set}", self.name)))
    }

    /// Writes rows of bytes into input `input` of binding set `set` (see [`RowWrite`]).
    pub fn write_input_rows(
        &self,
        set: usize,
        input: usize,
        rows: RowWrite,
        data: &[u8],
    ) -> Result<()> {
        let s = self.set(set)?;
        let handle = s
            .inputs
            .iter()
            .find(|x| x.0 == input)
            .map(|x| x.1)
            .ok_or_else(|| Error::backend("ane", format!("{}: no input {input}", self.name)))?;
        if let Some(&bytes) = self.input_bytes.get(input) {
            rows.check(data.len(), bytes)
                .map_err(|e| Error::backend("ane", format!("{}: {e}", self.name)))?;
        }
        let mut g = lock(&self.platform);
        let pname = g.name().to_string();
        g.write_surface_rows(handle, rows, data)
            .map_err(|e| err(&self.name, &pname, "writing an input surface", e))
    }

    /// Evaluates binding set `set` and reads the outputs (in declaration order).
    pub fn evaluate_set(&self, set: usize, outputs: &mut [&mut [u8]]) -> Result<()> {
        let s = self.set(set)?;
        self.check_outputs(outputs)?;
        let mut g = lock(&self.platform);
        let pname = g.name().to_string();
        g.evaluate(self.model, s.request)
            .map_err(|e| err(&self.name, &pname, "evaluate", e))?;
        for &(i, h) in &self.outputs {
            g.read_surface(h, outputs[i])
                .map_err(|e| err(&self.name, &pname, "reading an output surface", e))?;
        }
        Ok(())
    }

    fn check_outputs(&self, outputs: &[&mut [u8]]) -> Result<()> {
        let name = &self.name;
        if outputs.len() != self.outputs.len() {
            return Err(Error::backend(
                "ane",
                format!(
                    "{name}: called with {} outputs, the program has {}",
                    outputs.len(),
                    self.outputs.len()
                ),
            ));
        }
        for (i, o) in outputs.iter().enumerate() {
            if o.len() != self.output_bytes[i] {
                return Err(Error::backend(
                    "ane",
                    format!(
                        "{name}: output {i} has room for {} bytes, the program writes {}",
                        o.len(),
                        self.output_bytes[i]
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Writes the whole inputs of binding set 0 (in declaration order), evaluates, reads the
    /// outputs.
    pub fn run(&self, inputs: &[&[u8]], outputs: &mut [&mut [u8]]) -> Result<()> {
        let name = &self.name;
        let set = self.set(0)?;
        if inputs.len() != set.inputs.len() {
            return Err(Error::backend(
                "ane",
                format!(
                    "{name}: called with {} inputs and {} outputs, the program has {} and {}",
                    inputs.len(),
                    outputs.len(),
                    set.inputs.len(),
                    self.outputs.len()
                ),
            ));
        }
        for (i, data) in inputs.iter().enumerate() {
            if data.len() != self.input_bytes[i] {
                return Err(Error::backend(
                    "ane",
                    format!(
                        "{name}: input {i} has {} bytes, the program takes {}",
                        data.len(),
                        self.input_bytes[i]
                    ),
                ));
            }
        }
        self.check_outputs(outputs)?;
        {
            let mut g = lock(&self.platform);
            let pname = g.name().to_string();
            for &(i, s) in &set.inputs {
                g.write_surface(s, inputs[i])
                    .map_err(|e| err(name, &pname, "writing an input surface", e))?;
            }
        }
        self.evaluate_set(0, outputs)
    }
}

impl Drop for LoadedProgram {
    fn drop(&mut self) {
        let mut g = lock(&self.platform);
        for set in self.sets.drain(..).rev() {
            g.release_request(set.request);
            for (_, s) in set.inputs.into_iter().rev() {
                g.release_surface(s);
            }
        }
        for (_, s) in self.outputs.drain(..).rev() {
            g.release_surface(s);
        }
        if self.loaded {
            let _ = g.unload(self.model);
        }
        if self.model != 0 {
            g.release_model(self.model);
        }
        drop(g);
        if let Some(f) = self.folder.take()
            && folder_users(&f, -1) == 0
        {
            let _ = std::fs::remove_dir_all(f);
        }
    }
}

/// Counts the live programs using a model folder; returns the count after the change.
fn folder_users(folder: &std::path::Path, delta: i64) -> i64 {
    static USERS: Mutex<Option<std::collections::HashMap<PathBuf, i64>>> = Mutex::new(None);
    let mut g = USERS.lock().unwrap_or_else(|e| e.into_inner());
    let map = g.get_or_insert_with(Default::default);
    let n = map.entry(folder.to_path_buf()).or_insert(0);
    *n += delta;
    let now = *n;
    if now <= 0 {
        map.remove(folder);
    }
    now.max(0)
}

/// The caller's indices of `bindings` in the order the hardware binds them: alphabetical by
/// MIL name.
pub fn binding_order(bindings: &[Binding]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..bindings.len()).collect();
    order.sort_by(|&a, &b| bindings[a].name.cmp(&bindings[b].name));
    order
}

/// The one allocation size of a group of surfaces: the largest, at least the minimum.
pub fn surface_alloc(bindings: &[Binding]) -> usize {
    bindings
        .iter()
        .map(|b| b.bytes)
        .max()
        .unwrap_or(0)
        .max(MIN_SURFACE_BYTES)
}

/// `TMP/<hex>/model.mil` and `TMP/<hex>/weights/*.bin` (the `@model_path/` prefix dropped), as
/// the compiler expects to find them.
pub fn write_model_folder(folder: &std::path::Path, files: &ProgramFiles) -> std::io::Result<()> {
    std::fs::create_dir_all(folder)?;
    std::fs::write(folder.join("model.mil"), files.text.as_bytes())?;
    for (path, bytes) in &files.blobs {
        let rel = path.strip_prefix("@model_path/").unwrap_or(path);
        if rel.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("weight path {path:?} leaves the model folder"),
            ));
        }
        let dst = folder.join(rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(dst, bytes)?;
    }
    Ok(())
}

/// The program form a chip takes: M1 and M2 need `program(1.0)` / `ios16`, M3 and later take
/// `ios18`. `HANDGRAD_ANE_FORM=ios16|ios18` overrides the detection.
pub fn program_form(chip: &str) -> crate::backend::ane::mil::Target {
    use crate::backend::ane::mil::Target;
    match std::env::var("HANDGRAD_ANE_FORM").ok().as_deref() {
        Some("ios16") => return Target::Ios16,
        Some("ios18") => return Target::Ios18,
        _ => {}
    }
    let generation = chip
        .split_whitespace()
        .find_map(|w| w.strip_prefix('M').and_then(|n| n.parse::<u32>().ok()));
    match generation {
        Some(1) | Some(2) => Target::Ios16,
        _ => Target::Ios18,
    }
}

/// The chip's marketing name (`Apple M3 Pro`), where the OS says it.
pub fn chip_name() -> Option<String> {
    let out = std::process::Command::new("sysctl")
        .args(["-n", "machdep.cpu.brand_string"])
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && s.starts_with("Apple")).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ane::mil::Target;

    #[test]
    fn bindings_are_alphabetical_and_surfaces_equal_and_large_enough() {
        let b = |n: &str, bytes| Binding {
            name: n.into(),
            bytes,
        };
        let ins = [b("x", 100), b("mask", 70_000), b("a_weights", 10)];
        assert_eq!(binding_order(&ins), vec![2, 1, 0]);
        assert_eq!(surface_alloc(&ins), 70_000);
        assert_eq!(surface_alloc(&[b("x", 10)]), MIN_SURFACE_BYTES);
    }

    #[test]
    fn the_budget_reserves_whole_sets() {
        let b = CompileBudget::new(25);
        b.reserve(10).unwrap();
        b.reserve(10).unwrap();
        let e = b.reserve(10).unwrap_err().to_string();
        assert!(e.contains("20 of 25"), "{e}");
        assert_eq!(b.used(), 20);
        b.reserve(5).unwrap();
    }

    #[test]
    fn a_shared_model_folder_goes_with_its_last_user() {
        let f = std::path::Path::new("/nonexistent/handgrad-test-folder");
        assert_eq!(folder_users(f, 1), 1);
        assert_eq!(folder_users(f, 1), 2);
        assert_eq!(folder_users(f, -1), 1);
        assert_eq!(folder_users(f, -1), 0);
        assert_eq!(folder_users(f, -1), 0);
    }

    #[test]
    fn chips_get_their_program_form() {
        assert_eq!(program_form("Apple M1 Pro"), Target::Ios16);
        assert_eq!(program_form("Apple M2"), Target::Ios16);
        assert_eq!(program_form("Apple M3 Max"), Target::Ios18);
        assert_eq!(program_form("Apple M4"), Target::Ios18);
        assert_eq!(program_form("unknown"), Target::Ios18);
    }

    #[test]
    fn the_model_folder_stays_inside() {
        let dir = tempfile::tempdir().unwrap();
        let ok = ProgramFiles {
            text: "program(1.3)".into(),
            blobs: vec![("@model_path/weights/w.bin".into(), vec![1, 2])],
        };
        write_model_folder(&dir.path().join("abc"), &ok).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("abc/weights/w.bin")).unwrap(),
            vec![1, 2]
        );
        let bad = ProgramFiles {
            text: String::new(),
            blobs: vec![("@model_path/../../etc/x".into(), vec![])],
        };
        assert!(write_model_folder(&dir.path().join("def"), &bad).is_err());
    }
}
