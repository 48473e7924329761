//! A stand-in for the Neural Engine: it records every call, keeps the objects it hands out
//! (so tests see leaks), enforces the platform's traps as the hardware is reported to — small
//! or unequal surfaces fail at evaluate, an unloaded model does not evaluate (the order in
//! which inputs are bound is visible in the recorded calls) — and runs the programs with
//! handgrad's MIL simulator, so `--backend ane-fake` trains with real numbers through the
//! whole runtime call sequence. Failures can be injected.

use std::collections::HashMap;

use half::f16;

use super::{AnePlatform, Handle, MIN_SURFACE_BYTES, PlatformResult, RowWrite};
use crate::backend::ane::mil::{DType, ProgramFiles, parse};
use crate::backend::ane::sim::{Simulator, Tensor};

/// One recorded call.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    CreateModel {
        mil_bytes: usize,
        weights: usize,
    },
    ModelIdentifier(Handle),
    TemporaryDirectory,
    Compile(Handle),
    Load(Handle),
    Unload(Handle),
    ReleaseModel(Handle),
    CreateSurface(usize),
    ReleaseSurface(Handle),
    Write(Handle, usize),
    /// A strided write: the surface, its rows and their bytes.
    WriteRows(Handle, usize, usize),
    Read(Handle, usize),
    CreateRequest {
        inputs: Vec<Handle>,
        outputs: Vec<Handle>,
    },
    ReleaseRequest(Handle),
    Evaluate(Handle, Handle),
}

/// Failures to inject (1-based counts over the fake's life).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// The N-th compile fails as the leaking compiler does.
    pub compile_fails_at: Option<usize>,
    /// The N-th load fails (once; the runtime retries).
    pub load_fails_at: Option<usize>,
    /// The N-th evaluate returns NO with an error.
    pub evaluate_fails_at: Option<usize>,
    /// The N-th surface cannot be created.
    pub surface_fails_at: Option<usize>,
    /// The N-th model compiled computes wrong results (every output value off by one), as a
    /// compiler that mis-computes a form it was not shown would.
    pub wrong_results_at: Option<usize>,
}

struct Model {
    files: ProgramFiles,
    input_names: Vec<String>,
    sim: Option<Simulator>,
    compiled: bool,
    loaded: bool,
    /// Computes wrong results (an injected fault).
    wrong: bool,
}

/// The fake platform.
pub struct FakePlatform {
    pub calls: Vec<Call>,
    pub faults: Faults,
    /// Run the programs in the simulator (otherwise only the calls and traps are checked).
    pub execute: bool,
    next: Handle,
    models: HashMap<Handle, Model>,
    surfaces: HashMap<Handle, Vec<u8>>,
    requests: HashMap<Handle, (Vec<Handle>, Vec<Handle>)>,
    compiles: usize,
    loads: usize,
    evaluates: usize,
    surfaces_made: usize,
    /// This fake device's own temporary directory (as `NSTemporaryDirectory()` is the
    /// process's on a Mac), so that fakes in one process never share model folders.
    temp: Option<tempfile::TempDir>,
}

impl Drop for FakePlatform {
    fn drop(&mut self) {
        // The directory goes with the fake (TempDir removes it).
        self.temp.take();
    }
}

impl Default for FakePlatform {
    fn default() -> Self {
        Self::new(Faults::default())
    }
}

impl FakePlatform {
    pub fn new(faults: Faults) -> Self {
        FakePlatform {
            calls: Vec::new(),
            faults,
            execute: true,
            next: 0x1000,
            models: HashMap::new(),
            surfaces: HashMap::new(),
            requests: HashMap::new(),
            compiles: 0,
            loads: 0,
            evaluates: 0,
            surfaces_made: 0,
            temp: None,
        }
    }

    /// The folder [`AnePlatform::temporary_directory`] reports, once it has been asked.
    pub fn temp_path(&self) -> Option<std::path::PathBuf> {
        self.temp.as_ref().map(|t| t.path().to_path_buf())
    }

    /// Faults from `HANDGRAD_ANE_FAKE_FAULTS` (`compile:N,load:N,evaluate:N,surface:N,wrong:N`).
    pub fn from_env() -> Self {
        let mut f = Faults::default();
        if let Ok(spec) = std::env::var("HANDGRAD_ANE_FAKE_FAULTS") {
            for part in spec.split(',') {
                if let Some((k, n)) = part.split_once(':')
                    && let Ok(n) = n.trim().parse::<usize>()
                {
                    match k.trim() {
                        "compile" => f.compile_fails_at = Some(n),
                        "load" => f.load_fails_at = Some(n),
                        "evaluate" => f.evaluate_fails_at = Some(n),
                        "surface" => f.surface_fails_at = Some(n),
                        "wrong" => f.wrong_results_at = Some(n),
                        _ => {}
                    }
                }
            }
        }
        Self::new(f)
    }

    /// Objects handed out and not released: models, surfaces, requests.
    pub fn live(&self) -> (usize, usize, usize) {
        (self.models.len(), self.surfaces.len(), self.requests.len())
    }

    fn handle(&mut self) -> Handle {
        self.next += 1;
        self.next
    }
}

/// The names of a program's inputs, in declaration order (from `func main<...>(...)`).
fn input_names(text: &str) -> Vec<String> {
    match parse::parse(text) {
        Ok(p) => p.inputs.iter().map(|(name, _)| name.clone()).collect(),
        Err(_) => Vec::new(),
    }
}

impl AnePlatform for FakePlatform {
    fn name(&self) -> &str {
        "fake"
    }

    fn create_model(
        &mut self,
        mil_utf8: &[u8],
        weights: &[(String, Vec<u8>)],
    ) -> PlatformResult<Handle> {
        self.calls.push(Call::CreateModel {
            mil_bytes: mil_utf8.len(),
            weights: weights.len(),
        });
        let text = std::str::from_utf8(mil_utf8)
            .map_err(|_| "the MIL text is not UTF-8".to_string())?
            .to_string();
        let h = self.handle();
        let files = ProgramFiles {
            text: text.clone(),
            blobs: weights.to_vec(),
        };
        self.models.insert(
            h,
            Model {
                input_names: input_names(&text),
                files,
                sim: None,
                compiled: false,
                loaded: false,
                wrong: false,
            },
        );
        Ok(h)
    }

    fn model_identifier(&mut self, model: Handle) -> PlatformResult<String> {
        self.calls.push(Call::ModelIdentifier(model));
        if !self.models.contains_key(&model) {
            return Err("no such model".into());
        }
        Ok(format!("handgrad-fake-{}-{model:x}", std::process::id()))
    }

    fn temporary_directory(&mut self) -> PlatformResult<std::path::PathBuf> {
        self.calls.push(Call::TemporaryDirectory);
        if self.temp.is_none() {
            let t = tempfile::Builder::new()
                .prefix("handgrad-fake-ane-")
                .tempdir()
                .map_err(|e| format!("cannot make the fake's temporary directory: {e}"))?;
            self.temp = Some(t);
        }
        Ok(self
            .temp
            .as_ref()
            .map(|t| t.path().to_path_buf())
            .unwrap_or_default())
    }

    fn compile(&mut self, model: Handle) -> PlatformResult<()> {
        self.calls.push(Call::Compile(model));
        self.compiles += 1;
        if self.faults.compile_fails_at == Some(self.compiles) {
            return Err(format!(
                "Error Domain=com.apple.appleneuralengine.compiler Code=1 \"ANECCompile() FAILED\" (fake: compile {} injected)",
                self.compiles
            ));
        }
        let execute = self.execute;
        let wrong = self.faults.wrong_results_at == Some(self.compiles);
        let m = self.models.get_mut(&model).ok_or("no such model")?;
        m.wrong = wrong;
        // The compiler reads what the program names; the simulator checks the same.
        if execute {
            let sim = Simulator::new(&m.files)
                .map_err(|e| format!("the program does not compile: {e}"))?;
            m.sim = Some(sim);
        }
        m.compiled = true;
        Ok(())
    }

    fn load(&mut self, model: Handle) -> PlatformResult<()> {
        self.calls.push(Call::Load(model));
        self.loads += 1;
        if self.faults.load_fails_at == Some(self.loads) {
            return Err(
                "Error Domain=com.apple.appleneuralengine Code=2 \"load failed\" (fake)".into(),
            );
        }
        let m = self.models.get_mut(&model).ok_or("no such model")?;
        if !m.compiled {
            return Err("the model is not compiled".into());
        }
        m.loaded = true;
        Ok(())
    }

    fn unload(&mut self, model: Handle) -> PlatformResult<()> {
        self.calls.push(Call::Unload(model));
        let m = self.models.get_mut(&model).ok_or("no such model")?;
        m.loaded = false;
        Ok(())
    }

    fn release_model(&mut self, model: Handle) {
        self.calls.push(Call::ReleaseModel(model));
        self.models.remove(&model);
    }

    fn create_surface(&mut self, bytes: usize) -> PlatformResult<Handle> {
        self.calls.push(Call::CreateSurface(bytes));
        self.surfaces_made += 1;
        if self.faults.surface_fails_at == Some(self.surfaces_made) {
            return Err("IOSurfaceCreate returned NULL (fake)".into());
        }
        let h = self.handle();
        self.surfaces.insert(h, vec![0; bytes]);
        Ok(h)
    }

    fn release_surface(&mut self, surface: Handle) {
        self.calls.push(Call::ReleaseSurface(surface));
        self.surfaces.remove(&surface);
    }

    fn write_surface(&mut self, surface: Handle, data: &[u8]) -> PlatformResult<()> {
        self.calls.push(Call::Write(surface, data.len()));
        let s = self.surfaces.get_mut(&surface).ok_or("no such surface")?;
        if data.len() > s.len() {
            return Err(format!(
                "{} bytes do not fit a {}-byte surface",
                data.len(),
                s.len()
            ));
        }
        s[..data.len()].copy_from_slice(data);
        Ok(())
    }

    fn write_surface_rows(
        &mut self,
        surface: Handle,
        rows: RowWrite,
        data: &[u8],
    ) -> PlatformResult<()> {
        self.calls.push(Call::WriteRows(
            surface,
            data.len() / rows.row_len.max(1),
            rows.row_len,
        ));
        let s = self.surfaces.get_mut(&surface).ok_or("no such surface")?;
        rows.check(data.len(), s.len())?;
        for (i, row) in data.chunks_exact(rows.row_len).enumerate() {
            let at = rows.offset + i * rows.stride;
            s[at..at + rows.row_len].copy_from_slice(row);
        }
        Ok(())
    }

    fn read_surface(&mut self, surface: Handle, out: &mut [u8]) -> PlatformResult<()> {
        self.calls.push(Call::Read(surface, out.len()));
        let s = self.surfaces.get(&surface).ok_or("no such surface")?;
        if out.len() > s.len() {
            return Err(format!(
                "{} bytes asked of a {}-byte surface",
                out.len(),
                s.len()
            ));
        }
        out.copy_from_slice(&s[..out.len()]);
        Ok(())
    }

    fn create_request(&mut self, inputs: &[Handle], outputs: &[Handle]) -> PlatformResult<Handle> {
        self.calls.push(Call::CreateRequest {
            inputs: inputs.to_vec(),
            outputs: outputs.to_vec(),
        });
        for s in inputs.iter().chain(outputs) {
            if !self.surfaces.contains_key(s) {
                return Err("a request names a surface that does not exist".into());
            }
        }
        let h = self.handle();
        self.requests.insert(h, (inputs.to_vec(), outputs.to_vec()));
        Ok(h)
    }

    fn release_request(&mut self, request: Handle) {
        self.calls.push(Call::ReleaseRequest(request));
        self.requests.remove(&request);
    }

    fn evaluate(&mut self, model: Handle, request: Handle) -> PlatformResult<()> {
        self.calls.push(Call::Evaluate(model, request));
        self.evaluates += 1;
        if self.faults.evaluate_fails_at == Some(self.evaluates) {
            return Err("Error Domain=com.apple.appleneuralengine Code=3 \"evaluate failed: program execution error\" (fake)".into());
        }
        let (ins, outs) = self
            .requests
            .get(&request)
            .ok_or("no such request")?
            .clone();
        let m = self.models.get(&model).ok_or("no such model")?;
        if !m.loaded {
            return Err("the model is not loaded".into());
        }
        // The hardware's rules on surfaces: at least the minimum, equal within a group.
        for group in [&ins, &outs] {
            let sizes: Vec<usize> = group
                .iter()
                .map(|s| {
                    self.surfaces
                        .get(s)
                        .map(|b| b.len())
                        .ok_or("no such surface")
                })
                .collect::<Result<_, _>>()?;
            if sizes.iter().any(|&b| b < MIN_SURFACE_BYTES) {
                return Err(format!(
                    "a surface of {} bytes is below the minimum the hardware evaluates",
                    sizes.iter().min().unwrap_or(&0)
                ));
            }
            if sizes.windows(2).any(|w| w[0] != w[1]) {
                return Err(format!(
                    "surfaces of unequal sizes {sizes:?} in one request"
                ));
            }
        }
        if !self.execute {
            return Ok(());
        }
        if ins.len() != m.input_names.len() || outs.len() != 1 {
            return Err(format!(
                "the request binds {} inputs and {} outputs, the program has {} and 1",
                ins.len(),
                outs.len(),
                m.input_names.len()
            ));
        }
        let sim = m.sim.as_ref().ok_or("the model is not compiled")?;
        if ins.len() != 1 {
            // Several inputs: bound alphabetically by name; the simulator runs one-input
            // programs only, so the fake stops at checking the binding.
            return Err("the fake runs one-input programs only".into());
        }
        let ty = sim.input_type().clone();
        if ty.dtype != DType::Fp16 {
            return Err(format!("input type {ty} is not fp16"));
        }
        let n: usize = ty.shape.iter().product();
        let bytes = self.surfaces.get(&ins[0]).ok_or("no such surface")?;
        let data: Vec<f32> = bytes
            .get(..2 * n)
            .ok_or("the input surface is smaller than the program's input")?
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let out = sim.run(&Tensor::new(&ty, data))?;
        let off = if m.wrong { 1.0 } else { 0.0 };
        let out_bytes: Vec<u8> = out
            .data
            .iter()
            .flat_map(|v| f16::from_f32(*v + off).to_le_bytes())
            .collect();
        let dst = self.surfaces.get_mut(&outs[0]).ok_or("no such surface")?;
        if out_bytes.len() > dst.len() {
            return Err("the output does not fit its surface".into());
        }
        dst[..out_bytes.len()].copy_from_slice(&out_bytes);
        Ok(())
    }
}
