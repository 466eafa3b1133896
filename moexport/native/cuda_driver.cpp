#include "cuda_driver.h"

#include <dlfcn.h>

#include <mutex>

#include "error.h"

namespace moexport {
namespace cuda {

namespace {

void* symbol(void* library, const char* name) {
  void* found = dlsym(library, name);
  if (found == nullptr)
    throw Error(cat("the CUDA driver (libcuda.so.1) lacks ", name, ": a driver for CUDA 12 or newer is needed"));
  return found;
}

template <typename Fn>
void bind(Fn& slot, void* library, const char* name) {
  slot = reinterpret_cast<Fn>(symbol(library, name));
}

Api load() {
  void* library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr)
    throw Error(cat("the CUDA driver (libcuda.so.1) cannot be opened: ", dlerror(),
                    "; the compiled σ-MoE kernels need an NVIDIA GPU and its driver"));
  Api api{};
  bind(api.init, library, "cuInit");
  bind(api.get_error_string, library, "cuGetErrorString");
  bind(api.driver_get_version, library, "cuDriverGetVersion");
  bind(api.ctx_get_current, library, "cuCtxGetCurrent");
  bind(api.ctx_push_current, library, "cuCtxPushCurrent_v2");
  bind(api.ctx_pop_current, library, "cuCtxPopCurrent_v2");
  bind(api.ctx_get_device, library, "cuCtxGetDevice");
  bind(api.stream_get_ctx, library, "cuStreamGetCtx");
  bind(api.device_get_attribute, library, "cuDeviceGetAttribute");
  bind(api.module_load_data, library, "cuModuleLoadData");
  bind(api.module_unload, library, "cuModuleUnload");
  bind(api.module_get_function, library, "cuModuleGetFunction");
  bind(api.func_set_attribute, library, "cuFuncSetAttribute");
  bind(api.launch_kernel_ex, library, "cuLaunchKernelEx");
  bind(api.memset_d8_async, library, "cuMemsetD8Async");
  bind(api.thread_exchange_stream_capture_mode, library, "cuThreadExchangeStreamCaptureMode");
  Result status = api.init(0);
  if (status != 0) {
    const char* message = nullptr;
    if (api.get_error_string(status, &message) != 0 || message == nullptr) message = "unknown error";
    throw Error(cat("the CUDA driver did not start (cuInit: ", message, "); is there a usable NVIDIA GPU?"));
  }
  return api;
}

}  // namespace

const Api& api() {
  // A failed load is retried on the next call rather than cached: the message is the same, and a
  // process that installs a driver later is not stuck with the first answer.
  static std::mutex mutex;
  static Api* loaded = nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  if (loaded == nullptr) loaded = new Api(load());
  return *loaded;
}

void check(Result result, const char* what) {
  if (result == 0) return;
  const char* message = nullptr;
  // api() has been loaded by then: check() is only given results of its entry points
  if (api().get_error_string(result, &message) != 0 || message == nullptr) message = "unknown error";
  throw Error(cat(what, " failed: ", message, " (CUresult ", result, ")"));
}

}  // namespace cuda
}  // namespace moexport
