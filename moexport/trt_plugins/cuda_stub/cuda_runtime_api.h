// The TensorRT headers include <cuda_runtime_api.h> for two handle types only; this stand-in gives them
// (opaque pointers, as CUDA declares them), so that the plugins build without a CUDA toolkit.
#pragma once

typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
