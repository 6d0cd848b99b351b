// Mixed precision and memory format, which tch exposes only in part: tch's `autocast` switches
// CUDA's autocast alone, and tch has no memory formats. sac needs autocast on the CPU as well
// (libtorch's AutocastCPU, bf16 convolutions and matmuls on CPUs with native bf16) and
// channels-last batches (NHWC, which cuDNN's bf16 tensor-core kernels and oneDNN prefer).
//
// Autocast is thread-local state, as `torch.autocast` is in Python: it applies to the operators the
// calling thread runs until it is switched off again; backward follows the dtypes forward recorded.
// Every entry point catches C++ exceptions and reports them as a message.
#include <ATen/autocast_mode.h>
#include <ATen/ATen.h>

#include <cstddef>
#include <cstring>
#include <exception>

namespace {

void write_error(const char *what, char *error, size_t error_len) {
  if (error == nullptr || error_len == 0) return;
  std::strncpy(error, what, error_len - 1);
  error[error_len - 1] = '\0';
}

// sac's device codes: 0 the CPU, 1 CUDA.
at::DeviceType device_type(int device) { return device == 1 ? at::kCUDA : at::kCPU; }

}  // namespace

extern "C" {

// Switches autocast with bfloat16 on for `device` (0 CPU, 1 CUDA) on this thread, as entering
// `torch.autocast(device, dtype=torch.bfloat16)` does. Returns the previous enabled state (0 or
// 1) for `sac_autocast_exit`, or -1 with a message in `error`.
int sac_autocast_enter(int device, char *error, size_t error_len) {
  try {
    auto type = device_type(device);
    bool was = at::autocast::is_autocast_enabled(type);
    at::autocast::set_autocast_dtype(type, at::kBFloat16);
    at::autocast::set_autocast_enabled(type, true);
    at::autocast::increment_nesting();
    return was ? 1 : 0;
  } catch (const std::exception &e) {
    write_error(e.what(), error, error_len);
    return -1;
  }
}

// Leaves what `sac_autocast_enter` entered: restores the enabled state `was` and, when the
// outermost autocast region ends, drops the cache of casted weights (as Python's autocast does).
// Returns 0, or -1 with a message in `error`.
int sac_autocast_exit(int device, int was, char *error, size_t error_len) {
  try {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(device_type(device), was != 0);
    return 0;
  } catch (const std::exception &e) {
    write_error(e.what(), error, error_len);
    return -1;
  }
}

// Whether autocast is on for `device` on this thread (1, 0; -1 on an error).
int sac_autocast_enabled(int device) {
  try {
    return at::autocast::is_autocast_enabled(device_type(device)) ? 1 : 0;
  } catch (const std::exception &) {
    return -1;
  }
}

// A new tensor handle (`at::Tensor*`, freed by tch like its own) with the values of `tensor` in
// channels-last memory format (`t.contiguous(memory_format=torch.channels_last)`; a 4-D tensor).
// Null with a message in `error` on failure.
void *sac_channels_last(void *tensor, char *error, size_t error_len) {
  try {
    const at::Tensor &t = *static_cast<at::Tensor *>(tensor);
    return new at::Tensor(t.contiguous(at::MemoryFormat::ChannelsLast));
  } catch (const std::exception &e) {
    write_error(e.what(), error, error_len);
    return nullptr;
  }
}

// Whether `tensor` is laid out channels-last (1), not (0); -1 on an error.
int sac_is_channels_last(void *tensor) {
  try {
    const at::Tensor &t = *static_cast<at::Tensor *>(tensor);
    return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous() ? 1 : 0;
  } catch (const std::exception &) {
    return -1;
  }
}

}  // extern "C"
