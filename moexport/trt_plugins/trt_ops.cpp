// libmoexport_trt.so: the moexport op set as TensorRT plugins (IPluginV3; namespace "moexport", version
// "1"): SigmaMoE, TopKDispatch and CVMM, each running the compiled kernels of its configuration (a kernel
// bundle, `moexport fuse`) through the native launcher on TensorRT's stream. The ONNX Runtime op
// library (moexport/plugins/ort_ops.cpp) is its twin: the op set, the checks, the planning and the
// launches are moexport/native's; this file is what TensorRT's interfaces need around them.
//
// Fields (from the node's attributes, which the ONNX parser passes as plugin fields): the op's
// attributes (k, selection, activation, reduce), `kernels_key`, the key of its bundle, and `kernels`,
// the bundle's bytes, which `moexport build` gives to the first node of each configuration only (the
// others' are empty), so that an engine holds them once however many layers share them. Bundles live
// in a process-wide registry (native/ops.h), looked up by key when a plugin needs them (TensorRT
// deserialises layers in an order of its own).
//
// Written against the TensorRT 11.1 headers (vendored); links to nothing of TensorRT: it finds
// TensorRT's logger through setLoggerFinder and is found through getCreators.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "NvInferRuntime.h"

#include "../native/bundle.h"
#include "../native/error.h"
#include "../native/ops.h"

namespace {

using moexport::AttributeSpec;
using moexport::Bundle;
using moexport::Error;
using moexport::Launcher;
using moexport::OpCall;
using moexport::OpSpec;
using moexport::TensorArg;
using moexport::cat;
using namespace nvinfer1;

constexpr char kNamespace[] = "moexport";
constexpr char kVersion[] = "1";
constexpr char kKernels[] = "kernels";         // field: the bundle's bytes
constexpr char kKernelsKey[] = "kernels_key";  // field: the key of a bundle another plugin brings
// TensorRT hands plugins workspace at an alignment of its own; the launcher lays its buffers out at 256
constexpr size_t kAlign = moexport::Bundle::kWorkspaceAlign;

// ---- messages -----------------------------------------------------------------------------------

ILoggerFinder* g_logger_finder = nullptr;
thread_local std::string g_last_error;  // for callers without a logger: moexport_trt_last_error()

// Reports an error where TensorRT shows it: to the execution context's error recorder where there is
// one, else to the logger of the builder or runtime that called (or stderr, where none was found).
void report(const std::string& message, IErrorRecorder* recorder = nullptr) {
  g_last_error = message;
  if (recorder != nullptr) {
    recorder->reportError(ErrorCode::kFAILED_EXECUTION, message.c_str());
    return;
  }
  ILogger* logger = g_logger_finder != nullptr ? g_logger_finder->findLogger() : nullptr;
  if (logger != nullptr) logger->log(ILogger::Severity::kERROR, message.c_str());
  else std::fprintf(stderr, "moexport: %s\n", message.c_str());
}

// ---- types --------------------------------------------------------------------------------------

const char* dtype_name(DataType type) {
  switch (type) {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kBF16: return "bfloat16";
    case DataType::kINT32: return "int32";
    case DataType::kINT64: return "int64";
    case DataType::kUINT8: return "uint8";
    default: return "another element type";
  }
}

DataType data_type(const std::string& dtype) {
  if (dtype == "float16") return DataType::kHALF;
  if (dtype == "bfloat16") return DataType::kBF16;
  if (dtype == "int32") return DataType::kINT32;
  if (dtype == "int64") return DataType::kINT64;
  return DataType::kFLOAT;
}

TensorArg tensor_arg(DataType type, const Dims& dims) {
  TensorArg arg;
  arg.present = true;
  arg.dtype = dtype_name(type);
  arg.shape.assign(dims.d, dims.d + dims.nbDims);
  return arg;
}

// The plan buffer an op input or output binds ("" names none), or nullptr.
const moexport::BufferSpec* buffer(const std::vector<moexport::BufferSpec>& buffers, const std::string& name) {
  for (const auto& spec : buffers)
    if (!name.empty() && spec.name == name) return &spec;
  return nullptr;
}

// ---- fields -------------------------------------------------------------------------------------

// A plugin's configuration: the op's attributes as text, and its kernels (bytes or a key).
struct Fields {
  std::vector<std::pair<std::string, std::string>> attributes;
  std::string kernels;  // the bundle's bytes, when this plugin brings them (until it has parsed them)
  std::string key;      // the key of its bundle
  bool brings = false;  // whether the engine gets the bundle's bytes with this plugin

  const std::string* find(const std::string& name) const {
    for (const auto& entry : attributes)
      if (entry.first == name) return &entry.second;
    return nullptr;
  }
};

// A field's value as text (integers in decimal; strings without the NUL the ONNX parser ends them with).
std::string field_text(const PluginField& field) {
  if (field.data == nullptr || field.length <= 0) return "";
  switch (field.type) {
    case PluginFieldType::kINT32: return std::to_string(*static_cast<const int32_t*>(field.data));
    case PluginFieldType::kINT64: return std::to_string(*static_cast<const int64_t*>(field.data));
    case PluginFieldType::kINT16: return std::to_string(*static_cast<const int16_t*>(field.data));
    case PluginFieldType::kINT8: return std::to_string(*static_cast<const int8_t*>(field.data));
    default: break;
  }
  std::string text(static_cast<const char*>(field.data), static_cast<size_t>(field.length));
  if (!text.empty() && text.back() == '\0') text.pop_back();
  return text;
}

Fields read_fields(const OpSpec& op, const PluginFieldCollection* collection) {
  Fields fields;
  for (int32_t i = 0; collection != nullptr && i < collection->nbFields; ++i) {
    const PluginField& field = collection->fields[i];
    if (field.name == nullptr) continue;
    const std::string name = field.name;
    if (name == kKernels && field.data != nullptr && field.length > 1)  // one byte: the parser's NUL, no bundle
      fields.kernels.assign(static_cast<const char*>(field.data), static_cast<size_t>(field.length));  // NUL and all:
                                                                  // Bundle::parse knows where a bundle ends
    else if (name == kKernelsKey)
      fields.key = field_text(field);
    else
      for (const AttributeSpec& spec : op.attributes)
        if (name == spec.name) fields.attributes.emplace_back(name, field_text(field));
  }
  return fields;
}

// ---- the plugin ---------------------------------------------------------------------------------

class Plugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  Plugin(const OpSpec& op, std::string name, Fields fields, std::shared_ptr<Launcher> launcher)
      : op_(op), name_(std::move(name)), fields_(std::move(fields)), launcher_(std::move(launcher)) {
    where_ = cat("node '", name_, "' (", op_.name, ")");
  }

  // IPluginV3
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
      default: return static_cast<IPluginV3OneCore*>(this);
    }
  }

  IPluginV3* clone() noexcept override {
    try {
      return new Plugin(*this);
    } catch (const std::exception& error) {
      report(cat(where_, ": ", error.what()), recorder_);
      return nullptr;
    }
  }

  // IPluginV3OneCore
  const char* getPluginName() const noexcept override { return op_.name; }
  const char* getPluginVersion() const noexcept override { return kVersion; }
  const char* getPluginNamespace() const noexcept override { return kNamespace; }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override {
    return guard([&] { return static_cast<int32_t>(moexport::output_count(bundle())); }, -1);
  }

  int32_t getOutputDataTypes(DataType* outputs, int32_t nbOutputs, const DataType* inputs,
                             int32_t nbInputs) const noexcept override {
    return guard([&] {
      const Bundle& b = bundle();
      const moexport::PlanSpec& plan = b.plans().front();
      for (int32_t i = 0; i < nbInputs; ++i) {
        const auto* spec = buffer(plan.inputs, input_name(b, i));
        if (spec != nullptr && spec->dtype != dtype_name(inputs[i]))
          throw Error(cat("input '", op_.inputs[i].name, "' is ", dtype_name(inputs[i]), "; its kernels take ",
                          spec->dtype, ": fuse the model again from a graph of that precision"));
      }
      for (int32_t o = 0; o < nbOutputs; ++o) outputs[o] = data_type(output_buffer(b, o).dtype);
      return 0;
    }, 1);
  }

  int32_t getOutputShapes(const DimsExprs* inputs, int32_t nbInputs, const DimsExprs*, int32_t, DimsExprs* outputs,
                          int32_t nbOutputs, IExprBuilder& builder) noexcept override {
    return guard([&] {
      ShapeExprs shapes(*this, inputs, nbInputs, builder);
      for (int32_t o = 0; o < nbOutputs; ++o) outputs[o] = shapes.output(o);
      return 0;
    }, 1);
  }

  bool supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                 int32_t) noexcept override {
    return guard([&] {
      const PluginTensorDesc& desc = inOut[pos].desc;
      const Bundle& b = bundle();
      const moexport::BufferSpec* spec = pos < nbInputs ? buffer(b.plans().front().inputs, input_name(b, pos))
                                                        : &output_buffer(b, pos - nbInputs);
      return desc.format == TensorFormat::kLINEAR && spec != nullptr && spec->dtype == dtype_name(desc.type);
    }, false);
  }

  int32_t configurePlugin(const DynamicPluginTensorDesc* in, int32_t nbInputs, const DynamicPluginTensorDesc*,
                          int32_t) noexcept override {
    // the profile's largest inputs must fit the kernels: shapes, dtypes and token count
    return guard([&] {
      moexport::plan_op(op_, bundle(), largest(in, nbInputs));
      return 0;
    }, 1);
  }

  size_t getWorkspaceSize(const DynamicPluginTensorDesc* in, int32_t nbInputs, const DynamicPluginTensorDesc*,
                          int32_t) const noexcept override {
    return guard([&] { return moexport::workspace_bound(op_, bundle(), largest(in, nbInputs)) + kAlign; },
                 size_t{0});
  }

  const char* getTimingCacheID() noexcept override { return key().c_str(); }

  // What the engine inspector shows of the layer: the op's configuration and its kernels.
  const char* getMetadataString() noexcept override {
    metadata_ = cat(kNamespace, "::", op_.name);
    for (const auto& attribute : fields_.attributes) metadata_ += cat(" ", attribute.first, "=", attribute.second);
    metadata_ += cat(" kernels=", key(), fields_.brings ? "" : " (shared)");
    return metadata_.c_str();
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(const PluginTensorDesc* in, int32_t nbInputs, const PluginTensorDesc*,
                        int32_t) noexcept override {
    return guard([&] {
      plan(in, nbInputs);
      return 0;
    }, 1);
  }

  int32_t enqueue(const PluginTensorDesc* inputDesc, const PluginTensorDesc*, const void* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
    return guard([&] {
      // TensorRT says how many inputs there are in onShapeChange, which comes first
      if (!planned_) throw Error("enqueue came before onShapeChange");
      if (!same_shapes(inputDesc)) plan(inputDesc, static_cast<int32_t>(call_inputs_.size()));
      std::vector<const void*> in(op_.inputs.size(), nullptr);
      std::copy(inputs, inputs + call_inputs_.size(), in.begin());
      std::vector<void*> out(outputs, outputs + moexport::output_count(bundle()));
      auto base = reinterpret_cast<uintptr_t>(workspace);
      void* aligned = reinterpret_cast<void*>((base + kAlign - 1) / kAlign * kAlign);
      launcher().launch(call_.call, in, out, aligned, stream);  // cudaStream_t is the driver's CUstream
      return 0;
    }, 1);
  }

  IPluginV3* attachToContext(IPluginResourceContext* context) noexcept override {
    auto* copy = static_cast<Plugin*>(clone());
    if (copy != nullptr && context != nullptr) copy->recorder_ = context->getErrorRecorder();
    return copy;
  }

  const PluginFieldCollection* getFieldsToSerialize() noexcept override {
    return guard([&]() -> const PluginFieldCollection* {
      ints_.clear();
      serialized_.clear();
      ints_.reserve(fields_.attributes.size());
      for (const auto& attribute : fields_.attributes) {
        if (is_int(attribute.first)) {
          ints_.push_back(static_cast<int32_t>(std::stoll(attribute.second)));
          serialized_.emplace_back(attribute.first.c_str(), &ints_.back(), PluginFieldType::kINT32, 1);
        } else {
          serialized_.emplace_back(attribute.first.c_str(), attribute.second.data(), PluginFieldType::kCHAR,
                                   static_cast<int32_t>(attribute.second.size()));
        }
      }
      if (fields_.brings) {  // the bundle's bytes go into the engine with this plugin, once
        const std::vector<char>& bytes = bundle().bytes();
        serialized_.emplace_back(kKernels, bytes.data(), PluginFieldType::kUNKNOWN, static_cast<int32_t>(bytes.size()));
      }
      serialized_.emplace_back(kKernelsKey, fields_.key.data(), PluginFieldType::kCHAR,
                               static_cast<int32_t>(fields_.key.size()));
      collection_.nbFields = static_cast<int32_t>(serialized_.size());
      collection_.fields = serialized_.data();
      return &collection_;
    }, static_cast<const PluginFieldCollection*>(nullptr));
  }

 private:
  const OpSpec& op_;
  std::string name_, where_;
  Fields fields_;
  mutable std::shared_ptr<Launcher> launcher_;  // resolved by key at first use where it was not given
  IErrorRecorder* recorder_ = nullptr;
  // the call planned for the current shapes (onShapeChange), with the inputs it was planned for
  bool planned_ = false;
  OpCall call_;
  std::vector<TensorArg> call_inputs_;
  // storage behind what getFieldsToSerialize and getMetadataString return
  std::vector<int32_t> ints_;
  std::vector<PluginField> serialized_;
  PluginFieldCollection collection_{};
  std::string metadata_;

  // Runs `body`, turning an exception into a report (prefixed with the node) and `failed`.
  template <typename Body, typename Result>
  Result guard(Body&& body, Result failed) const noexcept {
    try {
      return body();
    } catch (const std::exception& error) {
      report(cat(where_, ": ", error.what()), recorder_);
    } catch (...) {
      report(cat(where_, ": an unexpected error"), recorder_);
    }
    return failed;
  }

  const std::string& key() const { return fields_.key; }

  Launcher& launcher() const {
    if (!launcher_) launcher_ = moexport::find_launcher(fields_.key);
    if (!launcher_)
      throw Error(cat("its kernels (bundle ", fields_.key, ") are not loaded: they come with the first node of its "
                      "configuration, which this network or engine lacks; build the engine again with moexport build"));
    return *launcher_;
  }
  const Bundle& bundle() const { return launcher().bundle(); }

  bool is_int(const std::string& name) const {
    for (const AttributeSpec& spec : op_.attributes)
      if (name == spec.name) return spec.string_default == nullptr;
    return false;
  }

  std::string input_name(const Bundle& b, int32_t i) const {
    return static_cast<size_t>(i) < b.input_names().size() ? b.input_names()[i] : "";
  }

  const moexport::BufferSpec& output_buffer(const Bundle& b, int32_t o) const {
    const auto& names = b.output_names();
    const auto* spec = static_cast<size_t>(o) < names.size() ? buffer(b.plans().front().outputs, names[o]) : nullptr;
    if (spec == nullptr) throw Error(cat("its kernels have no output ", o));
    return *spec;
  }

  std::vector<TensorArg> largest(const DynamicPluginTensorDesc* in, int32_t nbInputs) const {
    std::vector<TensorArg> args(op_.inputs.size());
    for (int32_t i = 0; i < nbInputs && static_cast<size_t>(i) < args.size(); ++i)
      args[i] = tensor_arg(in[i].desc.type, in[i].max);
    return args;
  }

  void plan(const PluginTensorDesc* in, int32_t nbInputs) {
    std::vector<TensorArg> args(op_.inputs.size());
    for (int32_t i = 0; i < nbInputs && static_cast<size_t>(i) < args.size(); ++i)
      args[i] = tensor_arg(in[i].type, in[i].dims);
    planned_ = false;
    call_ = moexport::plan_op(op_, bundle(), args);
    call_inputs_.assign(args.begin(), args.begin() + std::min<size_t>(nbInputs, args.size()));
    planned_ = true;
  }

  bool same_shapes(const PluginTensorDesc* in) const {
    for (size_t i = 0; i < call_inputs_.size(); ++i) {
      const Dims& dims = in[i].dims;
      const auto& shape = call_inputs_[i].shape;
      if (static_cast<size_t>(dims.nbDims) != shape.size() || !std::equal(shape.begin(), shape.end(), dims.d))
        return false;
    }
    return true;
  }

  // The output shapes of the op as TensorRT expressions of its input dimensions: the shapes of the
  // kernels' output buffers (the bundle's expressions), with the symbols they use bound as the plan's
  // inputs bind them; SigmaMoE's keep x's leading dimensions.
  class ShapeExprs {
   public:
    ShapeExprs(const Plugin& plugin, const DimsExprs* inputs, int32_t nbInputs, IExprBuilder& builder)
        : plugin_(plugin), builder_(builder) {
      const Bundle& b = plugin.bundle();
      const moexport::PlanSpec& plan = b.plans().front();
      for (int32_t i = 0; i < nbInputs; ++i) {
        const auto* spec = buffer(plan.inputs, plugin.input_name(b, i));
        if (spec == nullptr) continue;
        std::vector<const IDimensionExpr*> dims(inputs[i].d, inputs[i].d + inputs[i].nbDims);
        if (plugin.op_.rows && i == 0) {  // x [..., d] as rows [N, d]
          if (dims.empty()) throw Error("input 'x' must have at least one dimension [..., d]");
          lead_.assign(dims.begin(), dims.end() - 1);
          const IDimensionExpr* rows = builder.constant(1);
          for (const IDimensionExpr* d : lead_) rows = builder.operation(DimensionOperation::kPROD, *rows, *d);
          dims = {rows, dims.back()};
        }
        if (dims.size() != spec->shape.size())
          throw Error(cat("input '", plugin.op_.inputs[i].name, "' must have ", spec->shape.size(), " dimensions"));
        for (size_t d = 0; d < dims.size(); ++d) {
          const std::string& symbol = spec->shape[d].bare_symbol();
          if (!symbol.empty() && find(symbol) == nullptr) symbols_.emplace_back(symbol, dims[d]);
        }
      }
      for (const auto& derived : plan.derived) symbols_.emplace_back(derived.first, eval(derived.second.root()));
    }

    DimsExprs output(int32_t o) {
      const auto& spec = plugin_.output_buffer(plugin_.bundle(), o);
      std::vector<const IDimensionExpr*> dims;
      for (const auto& e : spec.shape) dims.push_back(eval(e.root()));
      if (plugin_.op_.rows && !dims.empty()) {
        const IDimensionExpr* last = dims.back();
        dims = lead_;
        dims.push_back(last);
      }
      if (dims.size() > static_cast<size_t>(Dims::MAX_DIMS)) throw Error("an output has too many dimensions");
      DimsExprs out{};
      out.nbDims = static_cast<int32_t>(dims.size());
      std::copy(dims.begin(), dims.end(), out.d);
      return out;
    }

   private:
    const Plugin& plugin_;
    IExprBuilder& builder_;
    std::vector<const IDimensionExpr*> lead_;
    std::vector<std::pair<std::string, const IDimensionExpr*>> symbols_;

    const IDimensionExpr* find(const std::string& name) const {
      for (const auto& entry : symbols_)
        if (entry.first == name) return entry.second;
      return nullptr;
    }

    const IDimensionExpr* eval(const moexport::Expr::Node& node) {
      using Op = moexport::Expr::Node::Op;
      switch (node.op) {
        case Op::Constant: return builder_.constant(node.value);
        case Op::Symbol: {
          const IDimensionExpr* found = find(node.name);
          if (found == nullptr) throw Error(cat("its kernels' shapes use the unbound symbol '", node.name, "'"));
          return found;
        }
        case Op::Neg: return builder_.operation(DimensionOperation::kSUB, *builder_.constant(0), *eval(*node.a));
        default: break;
      }
      const IDimensionExpr &a = *eval(*node.a), &b = *eval(*node.b);
      switch (node.op) {
        case Op::Add: return builder_.operation(DimensionOperation::kSUM, a, b);
        case Op::Sub: return builder_.operation(DimensionOperation::kSUB, a, b);
        case Op::Mul: return builder_.operation(DimensionOperation::kPROD, a, b);
        case Op::FloorDiv: return builder_.operation(DimensionOperation::kFLOOR_DIV, a, b);
        case Op::Cdiv: return builder_.operation(DimensionOperation::kCEIL_DIV, a, b);
        case Op::Min: return builder_.operation(DimensionOperation::kMIN, a, b);
        default: return builder_.operation(DimensionOperation::kMAX, a, b);
      }
    }
  };
};

// ---- creators -----------------------------------------------------------------------------------

class Creator : public IPluginCreatorV3One {
 public:
  explicit Creator(const OpSpec& op) : op_(op) {
    for (const AttributeSpec& spec : op.attributes)
      names_.emplace_back(spec.name, nullptr, spec.string_default ? PluginFieldType::kCHAR : PluginFieldType::kINT32, 1);
    names_.emplace_back(kKernels, nullptr, PluginFieldType::kCHAR, 0);
    names_.emplace_back(kKernelsKey, nullptr, PluginFieldType::kCHAR, 0);
    collection_.nbFields = static_cast<int32_t>(names_.size());
    collection_.fields = names_.data();
  }

  IPluginV3* createPlugin(const char* name, const PluginFieldCollection* fc, TensorRTPhase phase) noexcept override {
    const std::string where = cat("node '", name ? name : "", "' (", op_.name, ")");
    try {
      Fields fields = read_fields(op_, fc);
      std::vector<std::pair<std::string, std::string>> attributes;  // in the op's order, defaults filled in
      for (const AttributeSpec& spec : op_.attributes) {
        const std::string* value = fields.find(spec.name);
        attributes.emplace_back(spec.name, value ? *value : spec.string_default ? spec.string_default
                                                                                : std::to_string(spec.int_default));
      }
      fields.attributes = std::move(attributes);
      std::shared_ptr<Launcher> launcher;
      fields.brings = !fields.kernels.empty();
      if (fields.brings) launcher = moexport::shared_launcher(fields.kernels.data(), fields.kernels.size());
      else if (!fields.key.empty()) launcher = moexport::find_launcher(fields.key);
      else
        throw Error("carries no compiled kernels: fuse the model with them (moexport fuse) and build it with "
                    "moexport build, which hands them to TensorRT");
      if (launcher && !fields.key.empty() && fields.key != launcher->bundle().key())
        throw Error(cat("has kernels_key '", fields.key, "', but its kernels are '", launcher->bundle().key(), "'"));
      if (launcher) {
        fields.key = launcher->bundle().key();
        moexport::check_node(op_, launcher->bundle(),
                             [&fields](const AttributeSpec& spec) { return *fields.find(spec.name); }, 0);
      } else if (phase == TensorRTPhase::kBUILD) {  // when deserialising, the plugin that brings it may come later
        throw Error(cat("names the kernels '", fields.key, "', which no node before it brought: build the engine "
                        "with moexport build, which gives them to the first node of each configuration"));
      }
      fields.kernels.clear();  // the launcher's bundle keeps them
      return new Plugin(op_, name ? name : "", std::move(fields), std::move(launcher));
    } catch (const std::exception& error) {
      report(cat(where, ": ", error.what()));
    }
    return nullptr;
  }

  const PluginFieldCollection* getFieldNames() noexcept override { return &collection_; }
  const char* getPluginName() const noexcept override { return op_.name; }
  const char* getPluginVersion() const noexcept override { return kVersion; }
  const char* getPluginNamespace() const noexcept override { return kNamespace; }

 private:
  const OpSpec& op_;
  std::vector<PluginField> names_;
  PluginFieldCollection collection_{};
};

}  // namespace

extern "C" {

// TensorRT's entry point of a plugin library (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins,
// an engine's embedded copy): the creators of SigmaMoE, TopKDispatch and CVMM.
__attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static Creator sigma(moexport::kSigmaMoE), topk(moexport::kTopKDispatch), cvmm(moexport::kCVMM);
  static IPluginCreatorInterface* const creators[] = {&sigma, &topk, &cvmm};
  nbCreators = 3;
  return creators;
}

// TensorRT hands the library the means to find the logger of whichever builder or runtime calls it.
__attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder) { g_logger_finder = finder; }

// The last error a plugin of this thread reported (for callers that drive the plugins without
// TensorRT's logger, as the GPU tests do).
__attribute__((visibility("default"))) const char* moexport_trt_last_error() { return g_last_error.c_str(); }

}  // extern "C"
