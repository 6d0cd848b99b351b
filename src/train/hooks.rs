//! Gradient hooks: a call into Rust right after autograd has accumulated a parameter's gradient,
//! while backward goes on with the layers before it (`csrc/grad_hooks.cpp`, compiled by build.rs;
//! tch has no hooks). The gradient exchange uses them to start a bucket's allreduce as soon as its
//! gradients are complete.
//!
//! On the CPU the hooks run on the thread that called `backward()`; on a GPU autograd runs them on
//! its device threads, so the exchange installs none there. The listener is not thread-safe (it
//! shares the step's state through `Rc`/`RefCell`): a hook that finds itself on another thread
//! than the one that installed it, or inside its own listener, does not call it, and `check`
//! then fails loudly with what happened.
use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::panic::AssertUnwindSafe;

use anyhow::{bail, Result};
use tch::Tensor;

type ReadyFn = unsafe extern "C" fn(context: *mut c_void, index: usize);

extern "C" {
    fn sac_set_grad_hooks(
        tensors: *mut *mut c_void,
        n: usize,
        ready: ReadyFn,
        context: *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
    fn sac_clear_grad_hooks(tensors: *mut *mut c_void, n: usize, error: *mut c_char, error_len: usize) -> i32;
}

/// What the hooks call: the index of the parameter whose gradient is complete.
type Listener = Box<dyn FnMut(usize)>;

/// The listener and a panic it raised (re-raised by `GradHooks::check`: a panic must not unwind
/// through libtorch's C++ frames).
struct Context {
    listener: Listener,
    panic: Option<Box<dyn Any + Send>>,
}

/// What the C++ side points at: the listener, usable on its owner's thread only, and what went
/// wrong in a hook that could not use it (readable from any thread).
struct Shared {
    owner: std::thread::ThreadId,
    fault: std::sync::Mutex<Option<String>>,
    context: RefCell<Context>,
}

impl Shared {
    fn fault(&self, what: String) {
        let mut f = self.fault.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f.get_or_insert(what);
    }
}

/// Hooks on a list of parameters, calling one listener; removed when dropped.
pub struct GradHooks {
    params: Vec<Tensor>,
    /// Boxed so that the address the C++ side holds stays put.
    shared: Box<Shared>,
}

unsafe extern "C" fn ready(context: *mut c_void, index: usize) {
    // SAFETY: `context` is the `Shared` of a live `GradHooks` (its Drop removes the hooks before
    // the box goes). From another thread only `owner` and the mutex are touched.
    let shared = unsafe { &*(context as *const Shared) };
    let here = std::thread::current();
    if here.id() != shared.owner {
        shared.fault(format!(
            "a gradient hook ran on thread {:?} ({}), not on the thread that installed it: the gradient exchange \
             cannot start buckets from there",
            here.id(),
            here.name().unwrap_or("unnamed")
        ));
        return;
    }
    let Ok(mut c) = shared.context.try_borrow_mut() else {
        shared.fault(format!("the gradient hook of parameter {index} ran inside the hooks' own listener"));
        return;
    };
    if c.panic.is_some() {
        return;
    }
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (c.listener)(index)));
    if let Err(payload) = outcome {
        c.panic = Some(payload);
    }
}

fn tensor_handles(params: &[Tensor]) -> Vec<*mut c_void> {
    params.iter().map(|t| t.as_ptr() as *mut c_void).collect()
}

fn message(buf: &[u8]) -> String {
    CStr::from_bytes_until_nul(buf).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

impl GradHooks {
    /// Installs a hook on every parameter of `params` (leaf tensors that require grad) that calls
    /// `listener(i)` once backward has accumulated the gradient of `params[i]`.
    pub fn install(params: &[Tensor], listener: impl FnMut(usize) + 'static) -> Result<Self> {
        let hooks = GradHooks {
            params: params.iter().map(Tensor::shallow_clone).collect(),
            shared: Box::new(Shared {
                owner: std::thread::current().id(),
                fault: std::sync::Mutex::new(None),
                context: RefCell::new(Context { listener: Box::new(listener), panic: None }),
            }),
        };
        let mut handles = tensor_handles(&hooks.params);
        let mut error = [0u8; 512];
        let context = &*hooks.shared as *const Shared as *mut c_void;
        // SAFETY: the handles are live tch tensors (`at::Tensor*`) held by `hooks`; the context
        // outlives the hooks (Drop removes them first); `error` is writable for its length.
        let rc = unsafe {
            sac_set_grad_hooks(
                handles.as_mut_ptr(),
                handles.len(),
                ready,
                context,
                error.as_mut_ptr().cast(),
                error.len(),
            )
        };
        if rc != 0 {
            bail!("installing the gradient hooks: {}", message(&error));
        }
        Ok(hooks)
    }

    /// Re-raises a panic of the listener during the last backward pass, and fails if a hook could
    /// not call it (it ran on another thread, or inside the listener).
    pub fn check(&self) {
        let fault = self.shared.fault.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(what) = fault {
            panic!("{what}");
        }
        if let Some(payload) = self.shared.context.borrow_mut().panic.take() {
            std::panic::resume_unwind(payload);
        }
    }
}

impl Drop for GradHooks {
    fn drop(&mut self) {
        let mut handles = tensor_handles(&self.params);
        let mut error = [0u8; 512];
        // SAFETY: as in `install`.
        let rc = unsafe {
            sac_clear_grad_hooks(handles.as_mut_ptr(), handles.len(), error.as_mut_ptr().cast(), error.len())
        };
        if rc != 0 {
            // The hooks still point at the context: keep it alive rather than let them call freed memory.
            tracing::error!("removing the gradient hooks: {}", message(&error));
            let shared = std::mem::replace(
                &mut self.shared,
                Box::new(Shared {
                    owner: std::thread::current().id(),
                    fault: std::sync::Mutex::new(None),
                    context: RefCell::new(Context { listener: Box::new(|_| {}), panic: None }),
                }),
            );
            std::mem::forget(shared);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;
    use tch::{nn, nn::Module, Device, Kind};

    /// The hooks fire once per parameter and backward pass, after the gradient is accumulated, the
    /// last layer's first; dropping them removes them.
    #[test]
    fn hooks_fire_after_accumulation_in_backward_order_and_go_with_drop() {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = nn::seq().add(nn::linear(vs.root() / "a", 3, 4, Default::default())).add(nn::linear(
            vs.root() / "b",
            4,
            2,
            Default::default(),
        ));
        let vars = vs.variables();
        let params: Vec<Tensor> =
            ["a.weight", "a.bias", "b.weight", "b.bias"].iter().map(|n| vars[*n].shallow_clone()).collect();
        let seen = Rc::new(RefCell::new(Vec::new()));
        let log = Rc::clone(&seen);
        let watched: Vec<Tensor> = params.iter().map(Tensor::shallow_clone).collect();
        let hooks = GradHooks::install(&params, move |i| {
            // The gradient is there when the hook runs.
            let g = watched[i].grad();
            log.borrow_mut().push((i, g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0));
        })
        .unwrap();
        let x = Tensor::ones([5, 3], (Kind::Float, Device::Cpu));
        net.forward(&x).sum(Kind::Float).backward();
        hooks.check();
        let order: Vec<usize> = seen.borrow().iter().map(|&(i, _)| i).collect();
        assert!(seen.borrow().iter().all(|&(_, has_grad)| has_grad), "{:?}", seen.borrow());
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2, 3], "each parameter once: {order:?}");
        // Layer b's gradients are complete before layer a's.
        let pos = |i| order.iter().position(|&j| j == i).unwrap();
        assert!(pos(2) < pos(0) && pos(3) < pos(0) && pos(2) < pos(1), "{order:?}");

        drop(hooks);
        net.forward(&x).sum(Kind::Float).backward();
        assert_eq!(seen.borrow().len(), 4, "no hook after drop");
    }

    /// A panic in the listener does not cross libtorch: it comes back from `check`.
    #[test]
    fn a_panicking_listener_is_reraised_by_check() {
        let w = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let hooks = GradHooks::install(std::slice::from_ref(&w), |_| panic!("listener failed")).unwrap();
        (&w * 2.0).sum(Kind::Float).backward();
        let caught = std::panic::catch_unwind(AssertUnwindSafe(|| hooks.check()));
        assert!(caught.is_err());
        hooks.check(); // once only
    }

    /// A backward pass on another thread reaches the hooks there: they do not call the listener
    /// (not thread-safe), and `check` on the owner's thread fails naming what happened.
    #[test]
    fn a_hook_on_another_thread_does_not_call_the_listener_and_check_fails() {
        let w = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let calls = Rc::new(RefCell::new(0));
        let counter = Rc::clone(&calls);
        let hooks = GradHooks::install(std::slice::from_ref(&w), move |_| *counter.borrow_mut() += 1).unwrap();
        let w2 = w.shallow_clone();
        std::thread::spawn(move || (&w2 * 2.0).sum(Kind::Float).backward()).join().unwrap();
        assert_eq!(*calls.borrow(), 0);
        let caught = std::panic::catch_unwind(AssertUnwindSafe(|| hooks.check())).expect_err("check fails");
        let msg = caught.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("not on the thread that installed it"), "{msg}");
        // On the owner's thread all is well again.
        (&w * 2.0).sum(Kind::Float).backward();
        hooks.check();
        assert_eq!(*calls.borrow(), 1);
    }

    #[test]
    fn hooks_refuse_a_tensor_that_is_not_a_trained_leaf() {
        let w = Tensor::ones([2], (Kind::Float, Device::Cpu));
        let err = GradHooks::install(std::slice::from_ref(&w), |_| {}).err().expect("refused");
        assert!(err.to_string().contains("leaf tensors that require grad"), "{err}");
    }
}
