//! The real Neural Engine, through Apple's private `AppleNeuralEngine` framework. Nothing is
//! linked: the frameworks are opened with `dlopen` and every function (the Objective-C
//! runtime's `objc_msgSend`, `objc_getClass`, `sel_registerName`, IOSurface's and
//! CoreFoundation's) is looked up with `dlsym` when a platform is opened. So this file builds
//! and is type-checked on every OS, and elsewhere than on macOS with a Neural Engine
//! [`ApplePlatform::open`] fails with one clear error.
//!
//! `objc_msgSend` is called through function pointers of the exact prototype of each method
//! (required on arm64, where it is not variadic). Objects we keep are retained and released
//! by their owner; each call runs inside its own autorelease pool.
//!
//! This file has not been run on Apple hardware by its authors (no machine here has an
//! ANE); the call sequence it implements is the one [`super::LoadedProgram`] drives, tested
//! against [`super::fake::FakePlatform`].

use std::ffi::{CStr, CString, c_char, c_void};

use super::{AnePlatform, Handle, PlatformResult, QOS, RowWrite};
use crate::error::{Error, Result};

type Id = *mut c_void;
type Sel = *mut c_void;

const ANE_FRAMEWORK: &str =
    "/System/Library/PrivateFrameworks/AppleNeuralEngine.framework/AppleNeuralEngine";
const FOUNDATION: &str = "/System/Library/Frameworks/Foundation.framework/Foundation";
const IOSURFACE: &str = "/System/Library/Frameworks/IOSurface.framework/IOSurface";
const OBJC: &str = "/usr/lib/libobjc.A.dylib";

/// The functions resolved at open.
struct Api {
    get_class: unsafe extern "C" fn(*const c_char) -> Id,
    sel: unsafe extern "C" fn(*const c_char) -> Sel,
    msg_send: *const c_void,
    pool_push: unsafe extern "C" fn() -> *mut c_void,
    pool_pop: unsafe extern "C" fn(*mut c_void),
    retain: unsafe extern "C" fn(Id) -> Id,
    release: unsafe extern "C" fn(Id),
    surface_create: unsafe extern "C" fn(Id) -> *mut c_void,
    surface_lock: unsafe extern "C" fn(*mut c_void, u32, *mut u32) -> i32,
    surface_unlock: unsafe extern "C" fn(*mut c_void, u32, *mut u32) -> i32,
    surface_base: unsafe extern "C" fn(*mut c_void) -> *mut c_void,
    surface_alloc_size: unsafe extern "C" fn(*mut c_void) -> usize,
    cf_release: unsafe extern "C" fn(*mut c_void),
    /// Foundation's `NSTemporaryDirectory()`: the folder the framework itself uses (it
    /// differs from `$TMPDIR` under sudo, launchd or `env -i`).
    temporary_directory: unsafe extern "C" fn() -> Id,
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by the C library, valid
    // until the next dl* call on this thread; it is copied at once.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

fn open_lib(path: &str) -> std::result::Result<*mut c_void, String> {
    let c = CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a valid NUL-terminated path; dlopen has no other preconditions.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW) };
    if h.is_null() {
        Err(format!("{path}: {}", dl_error()))
    } else {
        Ok(h)
    }
}

fn symbol(lib: *mut c_void, name: &str) -> std::result::Result<*mut c_void, String> {
    let c = CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: `lib` is a handle returned by dlopen and `c` a valid NUL-terminated name.
    let p = unsafe { libc::dlsym(lib, c.as_ptr()) };
    if p.is_null() {
        Err(format!("symbol {name}: {}", dl_error()))
    } else {
        Ok(p)
    }
}

/// Reinterprets a symbol as a function pointer of the prototype the caller names.
macro_rules! func {
    ($lib:expr, $name:expr, $ty:ty) => {{
        let p = symbol($lib, $name)?;
        // SAFETY: the symbol is the C function of that name, whose documented prototype is
        // `$ty`; a function pointer and a data pointer have the same size on every platform
        // this can resolve on (macOS).
        unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
    }};
}

impl Api {
    fn load() -> std::result::Result<Api, String> {
        let objc = open_lib(OBJC)?;
        let foundation = open_lib(FOUNDATION)?;
        let iosurface = open_lib(IOSURFACE)?;
        open_lib(ANE_FRAMEWORK)?;
        let cf = open_lib("/System/Library/Frameworks/CoreFoundation.framework/CoreFoundation")?;
        Ok(Api {
            get_class: func!(
                objc,
                "objc_getClass",
                unsafe extern "C" fn(*const c_char) -> Id
            ),
            sel: func!(
                objc,
                "sel_registerName",
                unsafe extern "C" fn(*const c_char) -> Sel
            ),
            msg_send: symbol(objc, "objc_msgSend")?,
            pool_push: func!(
                objc,
                "objc_autoreleasePoolPush",
                unsafe extern "C" fn() -> *mut c_void
            ),
            pool_pop: func!(
                objc,
                "objc_autoreleasePoolPop",
                unsafe extern "C" fn(*mut c_void)
            ),
            retain: func!(objc, "objc_retain", unsafe extern "C" fn(Id) -> Id),
            release: func!(objc, "objc_release", unsafe extern "C" fn(Id)),
            surface_create: func!(
                iosurface,
                "IOSurfaceCreate",
                unsafe extern "C" fn(Id) -> *mut c_void
            ),
            surface_lock: func!(
                iosurface,
                "IOSurfaceLock",
                unsafe extern "C" fn(*mut c_void, u32, *mut u32) -> i32
            ),
            surface_unlock: func!(
                iosurface,
                "IOSurfaceUnlock",
                unsafe extern "C" fn(*mut c_void, u32, *mut u32) -> i32
            ),
            surface_base: func!(
                iosurface,
                "IOSurfaceGetBaseAddress",
                unsafe extern "C" fn(*mut c_void) -> *mut c_void
            ),
            surface_alloc_size: func!(
                iosurface,
                "IOSurfaceGetAllocSize",
                unsafe extern "C" fn(*mut c_void) -> usize
            ),
            cf_release: func!(cf, "CFRelease", unsafe extern "C" fn(*mut c_void)),
            temporary_directory: func!(
                foundation,
                "NSTemporaryDirectory",
                unsafe extern "C" fn() -> Id
            ),
        })
    }

    fn class(&self, name: &str) -> std::result::Result<Id, String> {
        let c = CString::new(name).map_err(|e| e.to_string())?;
        // SAFETY: objc_getClass takes a NUL-terminated name and returns nil when unknown.
        let cls = unsafe { (self.get_class)(c.as_ptr()) };
        if cls.is_null() {
            Err(format!(
                "class {name} not found (a macOS without the private ANE API?)"
            ))
        } else {
            Ok(cls)
        }
    }

    fn sel(&self, name: &str) -> Sel {
        let c = CString::new(name).unwrap_or_default();
        // SAFETY: sel_registerName takes a NUL-terminated name and always returns a selector.
        unsafe { (self.sel)(c.as_ptr()) }
    }
}

/// `objc_msgSend` with one fixed prototype per method shape.
macro_rules! send {
    ($api:expr, $ty:ty, $recv:expr, $sel:expr $(, $arg:expr)*) => {{
        // SAFETY: objc_msgSend is called with the prototype of the method named by `$sel`
        // (receiver, selector, then the method's arguments with their C types), which is how
        // it must be called; the receiver is a live object or class.
        unsafe {
            let f = std::mem::transmute::<*const c_void, $ty>($api.msg_send);
            f($recv, $api.sel($sel) $(, $arg)*)
        }
    }};
}

type FnId = unsafe extern "C" fn(Id, Sel) -> Id;
type FnIdId = unsafe extern "C" fn(Id, Sel, Id) -> Id;
type FnIdId3 = unsafe extern "C" fn(Id, Sel, Id, Id, Id) -> Id;
type FnIdBytes = unsafe extern "C" fn(Id, Sel, *const c_void, usize) -> Id;
type FnIdCStr = unsafe extern "C" fn(Id, Sel, *const c_char) -> Id;
type FnIdU64 = unsafe extern "C" fn(Id, Sel, u64) -> Id;
type FnIdObjsKeys = unsafe extern "C" fn(Id, Sel, *const Id, *const Id, usize) -> Id;
type FnIdObjs = unsafe extern "C" fn(Id, Sel, *const Id, usize) -> Id;
type FnIdRequest = unsafe extern "C" fn(Id, Sel, Id, Id, Id, Id, Id, Id, Id) -> Id;
type FnCStr = unsafe extern "C" fn(Id, Sel) -> *const c_char;
type FnBoolQosOptsErr = unsafe extern "C" fn(Id, Sel, u32, Id, *mut Id) -> bool;
type FnBoolQosErr = unsafe extern "C" fn(Id, Sel, u32, *mut Id) -> bool;
type FnBoolQosOptsReqErr = unsafe extern "C" fn(Id, Sel, u32, Id, Id, *mut Id) -> bool;

/// A surface: the IOSurface and its `_ANEIOSurfaceObject`.
struct SurfaceObj {
    surface: *mut c_void,
    object: Id,
    bytes: usize,
}

/// The Neural Engine through the private API.
pub struct ApplePlatform {
    api: Api,
    next: Handle,
    objects: std::collections::HashMap<Handle, Id>,
    surfaces: std::collections::HashMap<Handle, SurfaceObj>,
}

// SAFETY: the platform is used behind a Mutex (one thread at a time); the Objective-C objects
// it holds are not tied to the thread that created them.
unsafe impl Send for ApplePlatform {}

/// What a user sees where there is no Neural Engine.
pub fn not_available(why: &str) -> Error {
    Error::backend(
        "ane",
        format!(
            "the Apple Neural Engine is not available on this machine ({why}); use --backend ane-sim to run the same kernels in handgrad's simulator"
        ),
    )
}

impl ApplePlatform {
    /// Opens the frameworks and resolves every function and class.
    pub fn open() -> Result<Self> {
        if !cfg!(target_os = "macos") {
            return Err(not_available("it needs macOS on Apple silicon"));
        }
        let api = Api::load().map_err(|e| not_available(&e))?;
        for c in [
            "_ANEInMemoryModelDescriptor",
            "_ANEInMemoryModel",
            "_ANERequest",
            "_ANEIOSurfaceObject",
            "NSData",
            "NSString",
            "NSNumber",
            "NSDictionary",
            "NSArray",
        ] {
            api.class(c).map_err(|e| not_available(&e))?;
        }
        Ok(ApplePlatform {
            api,
            next: 1,
            objects: Default::default(),
            surfaces: Default::default(),
        })
    }

    /// Takes ownership of an object the caller has already retained (inside the pool that
    /// autoreleases it).
    fn keep(&mut self, obj: Id) -> Handle {
        self.next += 1;
        self.objects.insert(self.next, obj);
        self.next
    }

    fn obj(&self, h: Handle) -> PlatformResult<Id> {
        self.objects
            .get(&h)
            .copied()
            .ok_or_else(|| "no such object".to_string())
    }

    /// `-[model <selector>QoS:options:@{} error:]` with its BOOL and error checked.
    fn qos_options_call(&self, model: Handle, selector: &str) -> PlatformResult<()> {
        let m = self.obj(model)?;
        self.pooled(|api| {
            let opts = ns_dict(api, &[], &[])?;
            let mut err: Id = std::ptr::null_mut();
            let ok = send!(api, FnBoolQosOptsErr, m, selector, QOS, opts, &mut err);
            if ok {
                Ok(())
            } else {
                Err(error_text(api, err, selector))
            }
        })
    }

    /// Runs `f` inside an autorelease pool.
    fn pooled<T>(&self, f: impl FnOnce(&Api) -> T) -> T {
        // SAFETY: push and pop are paired on this thread around `f`.
        let pool = unsafe { (self.api.pool_push)() };
        let out = f(&self.api);
        // SAFETY: `pool` came from the push above.
        unsafe { (self.api.pool_pop)(pool) };
        out
    }
}

fn cls(api: &Api, name: &str) -> PlatformResult<Id> {
    api.class(name)
}

fn ns_string(api: &Api, s: &str) -> PlatformResult<Id> {
    let c = CString::new(s).map_err(|e| e.to_string())?;
    Ok(send!(
        api,
        FnIdCStr,
        cls(api, "NSString")?,
        "stringWithUTF8String:",
        c.as_ptr()
    ))
}

fn ns_data(api: &Api, bytes: &[u8]) -> PlatformResult<Id> {
    Ok(send!(
        api,
        FnIdBytes,
        cls(api, "NSData")?,
        "dataWithBytes:length:",
        bytes.as_ptr() as *const c_void,
        bytes.len()
    ))
}

fn ns_number(api: &Api, v: u64) -> PlatformResult<Id> {
    Ok(send!(
        api,
        FnIdU64,
        cls(api, "NSNumber")?,
        "numberWithUnsignedLongLong:",
        v
    ))
}

fn ns_dict(api: &Api, keys: &[Id], values: &[Id]) -> PlatformResult<Id> {
    Ok(send!(
        api,
        FnIdObjsKeys,
        cls(api, "NSDictionary")?,
        "dictionaryWithObjects:forKeys:count:",
        values.as_ptr(),
        keys.as_ptr(),
        keys.len()
    ))
}

fn ns_array(api: &Api, items: &[Id]) -> PlatformResult<Id> {
    Ok(send!(
        api,
        FnIdObjs,
        cls(api, "NSArray")?,
        "arrayWithObjects:count:",
        items.as_ptr(),
        items.len()
    ))
}

/// The text of an `NSError` (or a placeholder when the call gave none).
fn error_text(api: &Api, err: Id, what: &str) -> String {
    if err.is_null() {
        return format!("{what} returned NO without an error");
    }
    let desc = send!(api, FnId, err, "description");
    if desc.is_null() {
        return format!("{what} failed");
    }
    let s = send!(api, FnCStr, desc, "UTF8String");
    if s.is_null() {
        return format!("{what} failed");
    }
    // SAFETY: UTF8String returns a NUL-terminated string valid for the pool's lifetime;
    // copied at once.
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

impl AnePlatform for ApplePlatform {
    fn name(&self) -> &str {
        "AppleNeuralEngine.framework"
    }

    fn create_model(
        &mut self,
        mil_utf8: &[u8],
        weights: &[(String, Vec<u8>)],
    ) -> PlatformResult<Handle> {
        let model = self.pooled(|api| -> PlatformResult<Id> {
            let text = ns_data(api, mil_utf8)?;
            let (mut keys, mut values) = (Vec::new(), Vec::new());
            for (path, bytes) in weights {
                keys.push(ns_string(api, path)?);
                let entry = ns_dict(
                    api,
                    &[ns_string(api, "offset")?, ns_string(api, "data")?],
                    &[ns_number(api, 0)?, ns_data(api, bytes)?],
                )?;
                values.push(entry);
            }
            // An empty dictionary, never nil: nil fails silently.
            let dict = ns_dict(api, &keys, &values)?;
            let desc = send!(
                api,
                FnIdId3,
                cls(api, "_ANEInMemoryModelDescriptor")?,
                "modelWithMILText:weights:optionsPlist:",
                text,
                dict,
                std::ptr::null_mut()
            );
            if desc.is_null() {
                return Err("modelWithMILText:weights:optionsPlist: returned nil".into());
            }
            let model = send!(
                api,
                FnIdId,
                cls(api, "_ANEInMemoryModel")?,
                "inMemoryModelWithDescriptor:",
                desc
            );
            if model.is_null() {
                return Err("inMemoryModelWithDescriptor: returned nil".into());
            }
            // SAFETY: a live autoreleased object, retained before its pool is popped.
            unsafe { (api.retain)(model) };
            Ok(model)
        })?;
        Ok(self.keep(model))
    }

    fn model_identifier(&mut self, model: Handle) -> PlatformResult<String> {
        let m = self.obj(model)?;
        self.pooled(|api| {
            let s = send!(api, FnId, m, "hexStringIdentifier");
            if s.is_null() {
                return Err("hexStringIdentifier returned nil".into());
            }
            let c = send!(api, FnCStr, s, "UTF8String");
            if c.is_null() {
                return Err("hexStringIdentifier is not text".into());
            }
            // SAFETY: NUL-terminated, valid within the pool; copied at once.
            Ok(unsafe { CStr::from_ptr(c) }.to_string_lossy().into_owned())
        })
    }

    fn temporary_directory(&mut self) -> PlatformResult<std::path::PathBuf> {
        self.pooled(|api| {
            // SAFETY: NSTemporaryDirectory takes no arguments and returns an autoreleased
            // NSString (or nil), used inside this pool.
            let s = unsafe { (api.temporary_directory)() };
            if s.is_null() {
                return Err("NSTemporaryDirectory returned nil".into());
            }
            let c = send!(api, FnCStr, s, "UTF8String");
            if c.is_null() {
                return Err("NSTemporaryDirectory is not text".into());
            }
            // SAFETY: NUL-terminated, valid within the pool; copied at once.
            let path = unsafe { CStr::from_ptr(c) }.to_string_lossy().into_owned();
            Ok(std::path::PathBuf::from(path))
        })
    }

    fn compile(&mut self, model: Handle) -> PlatformResult<()> {
        self.qos_options_call(model, "compileWithQoS:options:error:")
    }

    fn load(&mut self, model: Handle) -> PlatformResult<()> {
        self.qos_options_call(model, "loadWithQoS:options:error:")
    }

    fn unload(&mut self, model: Handle) -> PlatformResult<()> {
        let m = self.obj(model)?;
        self.pooled(|api| {
            let mut err: Id = std::ptr::null_mut();
            let ok = send!(api, FnBoolQosErr, m, "unloadWithQoS:error:", QOS, &mut err);
            if ok {
                Ok(())
            } else {
                Err(error_text(api, err, "unloadWithQoS"))
            }
        })
    }

    fn release_model(&mut self, model: Handle) {
        if let Some(m) = self.objects.remove(&model) {
            // SAFETY: `m` was retained by `keep` and is released once.
            unsafe { (self.api.release)(m) };
        }
    }

    fn create_surface(&mut self, bytes: usize) -> PlatformResult<Handle> {
        let (surface, object) = self.pooled(|api| -> PlatformResult<(*mut c_void, Id)> {
            let n = |v: u64| ns_number(api, v);
            let props = ns_dict(
                api,
                &[
                    ns_string(api, "IOSurfaceWidth")?,
                    ns_string(api, "IOSurfaceHeight")?,
                    ns_string(api, "IOSurfaceBytesPerElement")?,
                    ns_string(api, "IOSurfaceBytesPerRow")?,
                    ns_string(api, "IOSurfaceAllocSize")?,
                    ns_string(api, "IOSurfacePixelFormat")?,
                ],
                &[
                    n(bytes as u64)?,
                    n(1)?,
                    n(1)?,
                    n(bytes as u64)?,
                    n(bytes as u64)?,
                    n(0)?,
                ],
            )?;
            // SAFETY: IOSurfaceCreate takes a CFDictionary of properties (an NSDictionary is
            // toll-free bridged) and returns a new surface or NULL.
            let surface = unsafe { (api.surface_create)(props) };
            if surface.is_null() {
                return Err(format!("IOSurfaceCreate({bytes} bytes) returned NULL"));
            }
            let object = send!(
                api,
                FnIdId,
                cls(api, "_ANEIOSurfaceObject")?,
                "objectWithIOSurface:",
                surface
            );
            if object.is_null() {
                // SAFETY: the surface was created above and is released once.
                unsafe { (api.cf_release)(surface) };
                return Err("objectWithIOSurface: returned nil".into());
            }
            // SAFETY: a live autoreleased object, retained to outlive the pool.
            unsafe { (api.retain)(object) };
            Ok((surface, object))
        })?;
        // SAFETY: `surface` is a live IOSurface.
        let alloc = unsafe { (self.api.surface_alloc_size)(surface) };
        self.next += 1;
        self.surfaces.insert(
            self.next,
            SurfaceObj {
                surface,
                object,
                bytes: alloc.max(bytes),
            },
        );
        Ok(self.next)
    }

    fn release_surface(&mut self, surface: Handle) {
        if let Some(s) = self.surfaces.remove(&surface) {
            // SAFETY: both were retained/created by `create_surface` and are released once.
            unsafe {
                (self.api.release)(s.object);
                (self.api.cf_release)(s.surface);
            }
        }
    }

    fn write_surface(&mut self, surface: Handle, data: &[u8]) -> PlatformResult<()> {
        let s = self.surfaces.get(&surface).ok_or("no such surface")?;
        if data.len() > s.bytes {
            return Err(format!(
                "{} bytes do not fit a {}-byte surface",
                data.len(),
                s.bytes
            ));
        }
        // SAFETY: the surface is live and locked for writing while its base address is used;
        // the copy stays within its allocation (checked above).
        unsafe {
            if (self.api.surface_lock)(s.surface, 0, std::ptr::null_mut()) != 0 {
                return Err("IOSurfaceLock failed".into());
            }
            let base = (self.api.surface_base)(s.surface) as *mut u8;
            std::ptr::copy_nonoverlapping(data.as_ptr(), base, data.len());
            (self.api.surface_unlock)(s.surface, 0, std::ptr::null_mut());
        }
        Ok(())
    }

    fn write_surface_rows(
        &mut self,
        surface: Handle,
        rows: RowWrite,
        data: &[u8],
    ) -> PlatformResult<()> {
        let s = self.surfaces.get(&surface).ok_or("no such surface")?;
        rows.check(data.len(), s.bytes)?;
        // SAFETY: the surface is live and locked for writing while its base address is used;
        // every row copied stays within its allocation and within `data` (checked above).
        unsafe {
            if (self.api.surface_lock)(s.surface, 0, std::ptr::null_mut()) != 0 {
                return Err("IOSurfaceLock failed".into());
            }
            let base = (self.api.surface_base)(s.surface) as *mut u8;
            for (i, row) in data.chunks_exact(rows.row_len).enumerate() {
                std::ptr::copy_nonoverlapping(
                    row.as_ptr(),
                    base.add(rows.offset + i * rows.stride),
                    rows.row_len,
                );
            }
            (self.api.surface_unlock)(s.surface, 0, std::ptr::null_mut());
        }
        Ok(())
    }

    fn read_surface(&mut self, surface: Handle, out: &mut [u8]) -> PlatformResult<()> {
        let s = self.surfaces.get(&surface).ok_or("no such surface")?;
        if out.len() > s.bytes {
            return Err(format!(
                "{} bytes asked of a {}-byte surface",
                out.len(),
                s.bytes
            ));
        }
        const READ_ONLY: u32 = 1;
        // SAFETY: as in `write_surface`, locked read-only for the copy.
        unsafe {
            if (self.api.surface_lock)(s.surface, READ_ONLY, std::ptr::null_mut()) != 0 {
                return Err("IOSurfaceLock failed".into());
            }
            let base = (self.api.surface_base)(s.surface) as *const u8;
            std::ptr::copy_nonoverlapping(base, out.as_mut_ptr(), out.len());
            (self.api.surface_unlock)(s.surface, READ_ONLY, std::ptr::null_mut());
        }
        Ok(())
    }

    fn create_request(&mut self, inputs: &[Handle], outputs: &[Handle]) -> PlatformResult<Handle> {
        let objs = |hs: &[Handle]| -> PlatformResult<Vec<Id>> {
            hs.iter()
                .map(|h| {
                    self.surfaces
                        .get(h)
                        .map(|s| s.object)
                        .ok_or_else(|| "no such surface".to_string())
                })
                .collect()
        };
        let (ins, outs) = (objs(inputs)?, objs(outputs)?);
        let request = self.pooled(|api| -> PlatformResult<Id> {
            let idx = |n: usize| -> PlatformResult<Vec<Id>> { (0..n as u64).map(|i| ns_number(api, i)).collect() };
            let r = send!(
                api,
                FnIdRequest,
                cls(api, "_ANERequest")?,
                "requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:",
                ns_array(api, &ins)?,
                ns_array(api, &idx(ins.len())?)?,
                ns_array(api, &outs)?,
                ns_array(api, &idx(outs.len())?)?,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                ns_number(api, 0)?
            );
            if r.is_null() {
                return Err("requestWithInputs:... returned nil".into());
            }
            // SAFETY: a live autoreleased object, retained before its pool is popped.
            unsafe { (api.retain)(r) };
            Ok(r)
        })?;
        Ok(self.keep(request))
    }

    fn release_request(&mut self, request: Handle) {
        self.release_model(request);
    }

    fn evaluate(&mut self, model: Handle, request: Handle) -> PlatformResult<()> {
        let (m, r) = (self.obj(model)?, self.obj(request)?);
        self.pooled(|api| {
            let opts = ns_dict(api, &[], &[])?;
            let mut err: Id = std::ptr::null_mut();
            let ok = send!(
                api,
                FnBoolQosOptsReqErr,
                m,
                "evaluateWithQoS:options:request:error:",
                QOS,
                opts,
                r,
                &mut err
            );
            if ok {
                Ok(())
            } else {
                Err(error_text(api, err, "evaluateWithQoS"))
            }
        })
    }
}

impl Drop for ApplePlatform {
    fn drop(&mut self) {
        let surfaces: Vec<Handle> = self.surfaces.keys().copied().collect();
        for s in surfaces {
            self.release_surface(s);
        }
        let objects: Vec<Handle> = self.objects.keys().copied().collect();
        for o in objects {
            self.release_model(o);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(not(target_os = "macos"))]
    fn elsewhere_it_says_the_engine_is_not_available() {
        let e = super::ApplePlatform::open().err().unwrap().to_string();
        assert!(
            e.contains("the Apple Neural Engine is not available on this machine"),
            "{e}"
        );
    }
}
