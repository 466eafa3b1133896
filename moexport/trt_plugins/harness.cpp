// libmoexport_trt_harness.so: calls the plugins of a plugin library through TensorRT's interfaces, as
// TensorRT does, for machines without TensorRT (the H200 has none): the library is opened with dlopen
// and its creators taken from getCreators; plugins are created from fields, configured, sized,
// serialised, created again in the runtime phase, attached to a context, and enqueued with TensorRT's
// argument structs (PluginField, DynamicPluginTensorDesc, PluginTensorDesc) and the caller's device
// pointers and stream. Each entry point is one TensorRT call; moexport/trt_plugins/harness.py drives
// them in TensorRT's order. It includes moexport's plugin code nowhere: what it tests is the library.
#include <dlfcn.h>

#include <cstring>
#include <string>
#include <vector>

#include "NvInferRuntime.h"

namespace {

using namespace nvinfer1;

// What the plugins log, as a builder's or runtime's logger would receive it.
class Logger : public ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kERROR) messages += std::string(messages.empty() ? "" : "\n") + msg;
  }
  std::string messages;
};

class Finder : public ILoggerFinder {
 public:
  ILogger* findLogger() noexcept override { return &logger; }
  Logger logger;
};

// An execution context's resources as attachToContext gets them (TensorRT's own allocator and error
// recorder are not there to give; the plugins then report to the logger).
class Context : public IPluginResourceContext {
 public:
  IGpuAllocator* getGpuAllocator() const noexcept override { return nullptr; }
  IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
};

Finder g_finder;
Context g_context;
std::string g_error;  // the harness's own errors (opening the library)

struct Library {
  void* handle = nullptr;
  std::vector<IPluginCreatorV3One*> creators;
};

template <typename Capability>
Capability* capability(void* plugin, PluginCapabilityType type) {
  return static_cast<Capability*>(static_cast<IPluginV3*>(plugin)->getCapabilityInterface(type));
}

IPluginV3OneBuild* build(void* plugin) { return capability<IPluginV3OneBuild>(plugin, PluginCapabilityType::kBUILD); }
IPluginV3OneRuntime* runtime(void* plugin) {
  return capability<IPluginV3OneRuntime>(plugin, PluginCapabilityType::kRUNTIME);
}

}  // namespace

extern "C" {

#define EXPORT __attribute__((visibility("default")))

// Opens a plugin library (dlopen), gives it the logger finder and takes its V3 creators; null on error.
EXPORT void* moexport_harness_open(const char* path) {
  void* handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    g_error = dlerror();
    return nullptr;
  }
  using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
  using SetLoggerFinder = void (*)(ILoggerFinder*);
  auto get_creators = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
  if (get_creators == nullptr) {
    g_error = std::string(path) + " exports no getCreators";
    return nullptr;
  }
  if (auto set_finder = reinterpret_cast<SetLoggerFinder>(dlsym(handle, "setLoggerFinder"))) set_finder(&g_finder);
  auto* library = new Library{handle, {}};
  int32_t n = 0;
  IPluginCreatorInterface* const* creators = get_creators(n);
  for (int32_t i = 0; i < n; ++i)
    if (std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0)
      library->creators.push_back(static_cast<IPluginCreatorV3One*>(creators[i]));
  return library;
}

// The creator of (name, version, namespace), as the plugin registry finds it; null if none.
EXPORT void* moexport_harness_creator(void* library, const char* name, const char* version, const char* ns) {
  for (IPluginCreatorV3One* creator : static_cast<Library*>(library)->creators)
    if (std::strcmp(creator->getPluginName(), name) == 0 && std::strcmp(creator->getPluginVersion(), version) == 0 &&
        std::strcmp(creator->getPluginNamespace(), ns) == 0)
      return creator;
  return nullptr;
}

EXPORT const PluginFieldCollection* moexport_harness_field_names(void* creator) {
  return static_cast<IPluginCreatorV3One*>(creator)->getFieldNames();
}

// phase: 0 build (the ONNX parser's call), 1 runtime (an engine's deserialisation).
EXPORT void* moexport_harness_create(void* creator, const char* name, const PluginField* fields, int32_t n,
                                     int32_t phase) {
  PluginFieldCollection collection{n, fields};
  return static_cast<IPluginCreatorV3One*>(creator)->createPlugin(name, &collection,
                                                                  static_cast<TensorRTPhase>(phase));
}

EXPORT void moexport_harness_destroy(void* plugin) { delete static_cast<IPluginV3*>(plugin); }

EXPORT const char* moexport_harness_core(void* plugin, int32_t what) {
  auto* core = capability<IPluginV3OneCore>(plugin, PluginCapabilityType::kCORE);
  return what == 0 ? core->getPluginName() : what == 1 ? core->getPluginVersion() : core->getPluginNamespace();
}

EXPORT int32_t moexport_harness_nb_outputs(void* plugin) { return build(plugin)->getNbOutputs(); }

EXPORT int32_t moexport_harness_output_types(void* plugin, DataType* outputs, int32_t nb_outputs,
                                             const DataType* inputs, int32_t nb_inputs) {
  return build(plugin)->getOutputDataTypes(outputs, nb_outputs, inputs, nb_inputs);
}

EXPORT int32_t moexport_harness_supports(void* plugin, int32_t pos, const DynamicPluginTensorDesc* in_out,
                                         int32_t nb_inputs, int32_t nb_outputs) {
  return build(plugin)->supportsFormatCombination(pos, in_out, nb_inputs, nb_outputs) ? 1 : 0;
}

EXPORT int32_t moexport_harness_configure(void* plugin, const DynamicPluginTensorDesc* in, int32_t nb_inputs,
                                          const DynamicPluginTensorDesc* out, int32_t nb_outputs) {
  return build(plugin)->configurePlugin(in, nb_inputs, out, nb_outputs);
}

EXPORT uint64_t moexport_harness_workspace(void* plugin, const DynamicPluginTensorDesc* in, int32_t nb_inputs,
                                           const DynamicPluginTensorDesc* out, int32_t nb_outputs) {
  return build(plugin)->getWorkspaceSize(in, nb_inputs, out, nb_outputs);
}

EXPORT const char* moexport_harness_metadata(void* plugin) { return build(plugin)->getMetadataString(); }

EXPORT const PluginFieldCollection* moexport_harness_serialize(void* plugin) {
  return runtime(plugin)->getFieldsToSerialize();
}

EXPORT void* moexport_harness_attach(void* plugin) { return runtime(plugin)->attachToContext(&g_context); }

EXPORT int32_t moexport_harness_shape_change(void* plugin, const PluginTensorDesc* in, int32_t nb_inputs,
                                             const PluginTensorDesc* out, int32_t nb_outputs) {
  return runtime(plugin)->onShapeChange(in, nb_inputs, out, nb_outputs);
}

EXPORT int32_t moexport_harness_enqueue(void* plugin, const PluginTensorDesc* in, const PluginTensorDesc* out,
                                        const void* const* inputs, void* const* outputs, void* workspace,
                                        void* stream) {
  return runtime(plugin)->enqueue(in, out, inputs, outputs, workspace, static_cast<cudaStream_t>(stream));
}

// What the plugins logged as errors since the last call (and the harness's own last error), then cleared.
EXPORT const char* moexport_harness_errors() {
  static std::string taken;
  taken = g_finder.logger.messages.empty() ? g_error : g_finder.logger.messages;
  g_finder.logger.messages.clear();
  g_error.clear();
  return taken.c_str();
}

}  // extern "C"
