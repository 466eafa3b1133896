// The part of the CUDA driver API the launcher uses, opened with dlopen("libcuda.so.1") at first use:
// the libraries build without a CUDA toolkit and load (and fail clearly) on machines without a GPU.
// Types and constants are the ABI of cuda.h (CUDA 12 / 13).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

// The driver's handles are pointers to these global structs, as cuda.h (and the CUDA runtime's
// cudaStream_t) declare them: declared here, they are one type in every file, whichever CUDA or
// TensorRT header a file included first.
struct CUctx_st;
struct CUmod_st;
struct CUfunc_st;
struct CUstream_st;

namespace moexport {
namespace cuda {

using Result = int;  // CUresult; 0 is CUDA_SUCCESS
using Device = int;
using DevicePtr = unsigned long long;
using Context = CUctx_st*;
using Module = CUmod_st*;
using Function = CUfunc_st*;
using Stream = CUstream_st*;

constexpr int kFuncAttributeMaxDynamicSharedSizeBytes = 8;
constexpr int kDeviceAttributeComputeCapabilityMajor = 75;
constexpr int kDeviceAttributeComputeCapabilityMinor = 76;
constexpr int kDeviceAttributeMaxSharedMemoryPerBlockOptin = 97;
constexpr int kLaunchAttributeProgrammaticStreamSerialization = 6;
constexpr int kStreamCaptureModeRelaxed = 2;

struct LaunchAttribute {  // CUlaunchAttribute: a 4-byte id, padding, a 64-byte value union
  int id;
  char pad[4];
  union {
    char bytes[64];
    int programmatic_stream_serialization_allowed;
  } value;
};

struct LaunchConfig {  // CUlaunchConfig
  unsigned grid_x, grid_y, grid_z;
  unsigned block_x, block_y, block_z;
  unsigned shared_bytes;
  Stream stream;
  LaunchAttribute* attrs;
  unsigned num_attrs;
};

// The driver's entry points, resolved once. `api()` throws moexport::Error when libcuda.so.1 (or one
// of the symbols) cannot be found, saying so.
struct Api {
  Result (*init)(unsigned);
  Result (*get_error_string)(Result, const char**);
  Result (*driver_get_version)(int*);
  Result (*ctx_get_current)(Context*);
  Result (*ctx_push_current)(Context);
  Result (*ctx_pop_current)(Context*);
  Result (*ctx_get_device)(Device*);
  Result (*stream_get_ctx)(Stream, Context*);
  Result (*device_get_attribute)(int*, int, Device);
  Result (*module_load_data)(Module*, const void*);
  Result (*module_unload)(Module);
  Result (*module_get_function)(Function*, Module, const char*);
  Result (*func_set_attribute)(Function, int, int);
  Result (*launch_kernel_ex)(const LaunchConfig*, Function, void**, void**);
  Result (*memset_d8_async)(DevicePtr, unsigned char, size_t, Stream);
  Result (*thread_exchange_stream_capture_mode)(int*);
};

const Api& api();

// Throws moexport::Error("<what>: <driver's message>") when `result` is not CUDA_SUCCESS.
void check(Result result, const char* what);

}  // namespace cuda
}  // namespace moexport
