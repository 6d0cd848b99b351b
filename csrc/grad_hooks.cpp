// sac's one piece of C++: gradient hooks, which tch does not expose.
//
// A post-accumulate-grad hook runs right after autograd has added a parameter's gradient of the
// current backward pass into `param.grad()` (the hook PyTorch's `register_post_accumulate_grad_hook`
// installs from Python). sac uses it to start the allreduce of a gradient bucket while backward
// still computes the gradients of earlier layers. On the CPU, autograd runs every node, and so
// every hook, on the thread that called `backward()`.
//
// The hooks call back into Rust through a plain C function pointer with an opaque context and the
// parameter's index; nothing here knows about MPI. Every entry point catches C++ exceptions and
// reports them as a message, so no exception crosses into Rust.
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstddef>
#include <cstring>
#include <exception>
#include <memory>

extern "C" {
typedef void (*sac_grad_ready_fn)(void *context, size_t index);
}

namespace {

struct ReadyHook : torch::autograd::PostAccumulateGradHook {
  ReadyHook(sac_grad_ready_fn ready, void *context, size_t index)
      : ready_(ready), context_(context), index_(index) {}
  void operator()(const torch::autograd::Variable & /*param*/) override {
    ready_(context_, index_);
  }
  sac_grad_ready_fn ready_;
  void *context_;
  size_t index_;
};

void write_error(const char *what, char *error, size_t error_len) {
  if (error == nullptr || error_len == 0) return;
  std::strncpy(error, what, error_len - 1);
  error[error_len - 1] = '\0';
}

}  // namespace

extern "C" {

// Installs on each of the `n` tensors (tch's tensor handles, `at::Tensor*`; leaf tensors that
// require grad) a hook that calls `ready(context, i)` once the gradient of tensor i is accumulated.
// A tensor holds one such hook: installing replaces an earlier one. Returns 0, or -1 with a message
// in `error`.
int sac_set_grad_hooks(void **tensors, size_t n, sac_grad_ready_fn ready, void *context, char *error,
                       size_t error_len) {
  try {
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor &t = *static_cast<at::Tensor *>(tensors[i]);
      if (!t.requires_grad() || !t.is_leaf()) {
        write_error("gradient hooks go on leaf tensors that require grad", error, error_len);
        return -1;
      }
      torch::autograd::impl::set_post_acc_grad_hooks(t, std::make_unique<ReadyHook>(ready, context, i));
    }
    return 0;
  } catch (const std::exception &e) {
    write_error(e.what(), error, error_len);
    return -1;
  }
}

// Removes the hooks `sac_set_grad_hooks` installed on the `n` tensors. Returns 0, or -1 with a
// message in `error`.
int sac_clear_grad_hooks(void **tensors, size_t n, char *error, size_t error_len) {
  try {
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor &t = *static_cast<at::Tensor *>(tensors[i]);
      torch::autograd::impl::set_post_acc_grad_hooks(t, nullptr);
    }
    return 0;
  } catch (const std::exception &e) {
    write_error(e.what(), error, error_len);
    return -1;
  }
}

}  // extern "C"
