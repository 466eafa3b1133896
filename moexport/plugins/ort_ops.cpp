// libmoexport_ort.so: the moexport op set (domain "moexport") on ONNX Runtime's CUDA execution provider.
//
// Each node runs the compiled kernels its file carries (a kernel bundle, `moexport fuse --arch`), read
// from its last input, a constant uint8 initializer kept in CPU memory and shared by the nodes of one
// configuration. The kernels run on ONNX Runtime's compute stream, their workspace comes from its
// allocator. Only the CUDA execution provider gets kernels from this library: elsewhere ONNX Runtime
// runs the nodes' model-local function bodies, as without it.
//
// Written against the ONNX Runtime C API of version 1.21 (vendored headers); loads in 1.21 and newer.
#include <atomic>
#include <climits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

#include "../native/bundle.h"
#include "../native/error.h"
#include "../native/ops.h"

namespace {

using moexport::AttributeSpec;
using moexport::Error;
using moexport::Launcher;
using moexport::OpSpec;
using moexport::TensorArg;
using moexport::cat;

using moexport::kSigmaMoE;

const OrtApi* g_api = nullptr;
std::atomic<uint64_t> g_compiled_calls{0};

// A port's element type as ONNX Runtime declares it: the op's T and R are left open (checked against
// the kernels at run time).
ONNXTensorElementDataType element_type(const char* dtype) {
  const std::string name = dtype;
  if (name == "float32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (name == "int32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  if (name == "int64") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

// ---- ONNX Runtime API helpers -------------------------------------------------------------------

void check(OrtStatus* status) {
  if (status == nullptr) return;
  std::string message = g_api->GetErrorMessage(status);
  g_api->ReleaseStatus(status);
  throw Error(message);
}

std::string dtype_name(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    default: return cat("element type ", static_cast<int>(type));
  }
}

TensorArg describe(const OrtValue* value) {
  TensorArg arg;
  if (value == nullptr) return arg;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(g_api->GetTensorTypeAndShape(value, &info));
  ONNXTensorElementDataType type;
  size_t rank = 0;
  OrtStatus* status = g_api->GetTensorElementType(info, &type);
  if (status == nullptr) status = g_api->GetDimensionsCount(info, &rank);
  arg.shape.resize(rank);
  if (status == nullptr && rank > 0) status = g_api->GetDimensions(info, arg.shape.data(), rank);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  check(status);
  arg.present = true;
  arg.dtype = dtype_name(type);
  return arg;
}

std::string node_name(const OrtKernelInfo* info) {
  size_t size = 0;
  if (g_api->KernelInfo_GetNodeName(info, nullptr, &size) != nullptr || size == 0) return "";
  std::string name(size, '\0');
  OrtStatus* status = g_api->KernelInfo_GetNodeName(info, name.data(), &size);
  if (status != nullptr) {
    g_api->ReleaseStatus(status);
    return "";
  }
  name.resize(size > 0 ? size - 1 : 0);
  return name;
}

// The node's value of an attribute as text, or the op set's default where the node has none.
std::string attribute(const OrtKernelInfo* info, const AttributeSpec& spec) {
  if (spec.string_default == nullptr) {
    int64_t value = spec.int_default;
    if (OrtStatus* absent = g_api->KernelInfoGetAttribute_int64(info, spec.name, &value)) g_api->ReleaseStatus(absent);
    return std::to_string(value);
  }
  size_t size = 0;
  if (OrtStatus* absent = g_api->KernelInfoGetAttribute_string(info, spec.name, nullptr, &size)) {
    g_api->ReleaseStatus(absent);
    return spec.string_default;
  }
  std::string value(size, '\0');
  check(g_api->KernelInfoGetAttribute_string(info, spec.name, value.data(), &size));
  value.resize(size > 0 ? size - 1 : 0);
  return value;
}

// ---- the kernel ---------------------------------------------------------------------------------

struct Kernel {
  using Shape = moexport::Shape;

  const OpSpec* def = nullptr;
  bool cuda = true;  // else the CPU execution provider's: checked like the CUDA one, then refused
  std::string where;  // "node 'name' (SigmaMoE)", how errors start
  std::shared_ptr<Launcher> launcher;
  OrtAllocator* allocator = nullptr;
  size_t kernels_input = 0;  // the index of 'kernels', after the op's own inputs

  ~Kernel() {
    if (allocator != nullptr) g_api->ReleaseAllocator(allocator);
  }

  void create(const OrtKernelInfo* info) {
    kernels_input = def->inputs.size();
    size_t inputs = 0;
    check(g_api->KernelInfo_GetInputCount(info, &inputs));
    int is_constant = 0;
    const OrtValue* bundle = nullptr;
    if (inputs > kernels_input) check(g_api->KernelInfoGetConstantInput_tensor(info, kernels_input, &is_constant, &bundle));
    if (bundle == nullptr || !is_constant)
      throw Error("carries no compiled kernels (its last input 'kernels' is missing or not a constant "
                  "initializer): run `moexport fuse` on the model to compile them, or run it without the "
                  "moexport op library (ONNX Runtime then runs the function bodies)");
    TensorArg bytes = describe(bundle);
    if (bytes.dtype != "uint8" || bytes.shape.size() != 1)
      throw Error("its 'kernels' input must be a 1-D uint8 tensor (a kernel bundle)");
    void* data = nullptr;
    check(g_api->GetTensorMutableData(const_cast<OrtValue*>(bundle), &data));
    launcher = moexport::shared_launcher(data, static_cast<size_t>(bytes.shape[0]));
    size_t outputs = 0;
    check(g_api->KernelInfo_GetOutputCount(info, &outputs));
    moexport::check_node(*def, launcher->bundle(), [info](const AttributeSpec& spec) { return attribute(info, spec); },
                         outputs);
    if (!cuda)
      throw Error("the moexport op library runs these nodes on ONNX Runtime's CUDA execution provider only; "
                  "on the CPU, create the session without it and ONNX Runtime runs the function bodies");
    check(g_api->KernelInfoGetAllocator(info, OrtMemTypeDefault, &allocator));
  }

  void compute(OrtKernelContext* context) {
    size_t input_count = 0, output_count = 0;
    check(g_api->KernelContext_GetInputCount(context, &input_count));
    check(g_api->KernelContext_GetOutputCount(context, &output_count));
    std::vector<TensorArg> args(kernels_input);
    std::vector<const void*> pointers(kernels_input, nullptr);
    for (size_t i = 0; i < kernels_input && i < input_count; ++i) {
      const OrtValue* value = nullptr;
      check(g_api->KernelContext_GetInput(context, i, &value));
      if (value == nullptr) continue;
      args[i] = describe(value);
      void* data = nullptr;
      check(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
      pointers[i] = data;
    }
    moexport::OpCall call = moexport::plan_op(*def, launcher->bundle(), args);
    std::vector<void*> outputs(output_count, nullptr);
    for (size_t o = 0; o < output_count; ++o) {
      const Shape& shape = call.output_shapes[o];
      OrtValue* value = nullptr;
      check(g_api->KernelContext_GetOutput(context, o, shape.data(), shape.size(), &value));
      if (value == nullptr) continue;  // an optional output the node does not produce
      check(g_api->GetTensorMutableData(value, &outputs[o]));
    }
    void* stream = nullptr;
    check(g_api->KernelContext_GetGPUComputeStream(context, &stream));
    void* workspace = nullptr;
    const size_t bytes = call.call.workspace_bytes;
    check(g_api->AllocatorAlloc(allocator, bytes > 0 ? bytes : 1, &workspace));
    try {
      launcher->launch(call.call, pointers, outputs, workspace, static_cast<moexport::cuda::Stream>(stream));
    } catch (...) {
      if (OrtStatus* status = g_api->AllocatorFree(allocator, workspace)) g_api->ReleaseStatus(status);
      throw;
    }
    // the allocator is stream-ordered: later kernels that reuse this memory run after ours
    check(g_api->AllocatorFree(allocator, workspace));
    ++g_compiled_calls;
  }
};

// SigmaMoE's y has x's element type (T, which ONNX Runtime cannot tell from several T inputs) and
// shape [..., v_dim]: x's leading dimensions, the last of values.
OrtStatus* infer_sigma_moe(const OrtCustomOp*, OrtShapeInferContext* context) {
  OrtTensorTypeAndShapeInfo *x = nullptr, *values = nullptr, *y = nullptr;
  OrtStatus* status = g_api->ShapeInferContext_GetInputTypeShape(context, 0, &x);
  if (status == nullptr) status = g_api->ShapeInferContext_GetInputTypeShape(context, 3, &values);
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t rank = 0, values_rank = 0;
  if (status == nullptr) status = g_api->GetTensorElementType(x, &type);
  if (status == nullptr) status = g_api->GetDimensionsCount(x, &rank);
  if (status == nullptr) status = g_api->GetDimensionsCount(values, &values_rank);
  std::vector<int64_t> dims(rank), value_dims(values_rank);
  std::vector<const char*> names(rank, "");
  if (status == nullptr && rank > 0) status = g_api->GetDimensions(x, dims.data(), rank);
  if (status == nullptr && rank > 0) status = g_api->GetSymbolicDimensions(x, names.data(), rank);
  if (status == nullptr && values_rank > 0) status = g_api->GetDimensions(values, value_dims.data(), values_rank);
  if (status == nullptr && rank > 0) {
    dims.back() = values_rank == 3 ? value_dims.back() : -1;
    names.back() = "";
    status = g_api->CreateTensorTypeAndShapeInfo(&y);
    if (status == nullptr) status = g_api->SetTensorElementType(y, type);
    if (status == nullptr) status = g_api->SetDimensions(y, dims.data(), rank);
    if (status == nullptr) status = g_api->SetSymbolicDimensions(y, names.data(), rank);
    if (status == nullptr) status = g_api->ShapeInferContext_SetOutputTypeShape(context, 0, y);
  }
  if (y != nullptr) g_api->ReleaseTensorTypeAndShapeInfo(y);  // the inputs' belong to the context
  return status;
}

OrtStatus* fail(const std::string& where, const char* what) {
  return g_api->CreateStatus(ORT_FAIL, cat(where, ": ", what).c_str());
}

// ---- the custom ops -----------------------------------------------------------------------------

// Each op is registered for the CUDA execution provider, and for the CPU one with a kernel that checks
// the node as on CUDA and then refuses it: ONNX Runtime does not fall back to a node's function body
// once a library defines its op, so a CPU session with this library fails at creation, saying why,
// instead of with "could not find an implementation".
struct CustomOp : OrtCustomOp {
  const OpSpec* def;
  bool cuda;

  CustomOp(const OpSpec* op_def, bool on_cuda) : OrtCustomOp{}, def(op_def), cuda(on_cuda) {
    version = ORT_API_VERSION;
    GetName = [](const OrtCustomOp* op) { return static_cast<const CustomOp*>(op)->def->name; };
    GetExecutionProviderType = [](const OrtCustomOp* op) {
      return static_cast<const CustomOp*>(op)->cuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
    };
    // the op's inputs, then 'kernels': the bundle, optional, read on the host when the kernel is created
    GetInputTypeCount = [](const OrtCustomOp* op) { return static_cast<const CustomOp*>(op)->def->inputs.size() + 1; };
    GetInputType = [](const OrtCustomOp* op, size_t i) {
      const auto& inputs = static_cast<const CustomOp*>(op)->def->inputs;
      return i == inputs.size() ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : element_type(inputs[i].dtype);
    };
    GetOutputTypeCount = [](const OrtCustomOp* op) { return static_cast<const CustomOp*>(op)->def->outputs.size(); };
    GetOutputType = [](const OrtCustomOp* op, size_t i) {
      return element_type(static_cast<const CustomOp*>(op)->def->outputs[i].dtype);
    };
    GetInputCharacteristic = [](const OrtCustomOp* op, size_t i) {
      const auto& inputs = static_cast<const CustomOp*>(op)->def->inputs;
      return i == inputs.size() || inputs[i].optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    };
    GetOutputCharacteristic = [](const OrtCustomOp* op, size_t i) {
      return static_cast<const CustomOp*>(op)->def->outputs[i].optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    };
    GetInputMemoryType = [](const OrtCustomOp* op, size_t i) {
      return i == static_cast<const CustomOp*>(op)->def->inputs.size() ? OrtMemTypeCPUInput : OrtMemTypeDefault;
    };
    GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
    GetStartVersion = [](const OrtCustomOp*) { return 1; };
    GetEndVersion = [](const OrtCustomOp*) { return INT_MAX; };
    KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
    if (def == &kSigmaMoE) InferOutputShapeFn = infer_sigma_moe;
    CreateKernelV2 = [](const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info, void** out) -> OrtStatus* {
      auto kernel = std::make_unique<Kernel>();
      kernel->def = static_cast<const CustomOp*>(op)->def;
      kernel->cuda = static_cast<const CustomOp*>(op)->cuda;
      kernel->where = cat("node '", node_name(info), "' (", kernel->def->name, ")");
      try {
        kernel->create(info);
      } catch (const std::exception& error) {
        return fail(kernel->where, error.what());
      }
      *out = kernel.release();
      return nullptr;
    };
    KernelComputeV2 = [](void* raw, OrtKernelContext* context) -> OrtStatus* {
      auto* kernel = static_cast<Kernel*>(raw);
      try {
        kernel->compute(context);
      } catch (const std::exception& error) {
        return fail(kernel->where, error.what());
      }
      return nullptr;
    };
  }
};

}  // namespace

extern "C" {

// ONNX Runtime's entry point: adds the domain "moexport" with SigmaMoE, TopKDispatch and CVMM for the
// CUDA execution provider to the session options.
__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                    const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    const OrtApi* oldest = api_base->GetApi(1);
    return oldest->CreateStatus(ORT_FAIL, cat("libmoexport_ort needs ONNX Runtime 1.21 or newer (C API version ",
                                              ORT_API_VERSION, "); this is ", api_base->GetVersionString()).c_str());
  }
  g_api = api;
  using moexport::kCVMM;
  using moexport::kTopKDispatch;
  static CustomOp ops[] = {CustomOp(&kSigmaMoE, true), CustomOp(&kTopKDispatch, true), CustomOp(&kCVMM, true),
                           CustomOp(&kSigmaMoE, false), CustomOp(&kTopKDispatch, false), CustomOp(&kCVMM, false)};
  // one domain for every session: it must outlive them all, so it is never released
  static OrtCustomOpDomain* domain = nullptr;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (domain == nullptr) {
    OrtStatus* status = api->CreateCustomOpDomain("moexport", &domain);
    for (auto& op : ops)
      if (status == nullptr) status = api->CustomOpDomain_Add(domain, &op);
    if (status != nullptr) {
      domain = nullptr;
      return status;
    }
  }
  return api->AddCustomOpDomain(options, domain);
}

// How many node executions ran on the compiled kernels in this process (what `moexport validate`
// reports: compiled kernels, or the function bodies).
__attribute__((visibility("default"))) uint64_t moexport_ort_compiled_calls() { return g_compiled_calls.load(); }

}  // extern "C"
