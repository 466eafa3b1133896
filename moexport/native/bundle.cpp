#include "bundle.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstring>

#include "error.h"

namespace moexport {

size_t dtype_size(const std::string& dtype) {
  if (dtype == "float32" || dtype == "int32") return 4;
  if (dtype == "float16" || dtype == "bfloat16") return 2;
  if (dtype == "int64") return 8;
  throw Error(cat("kernel bundle: unknown dtype '", dtype, "'"));
}

namespace {

std::string show(const Shape& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

Expr expression(const Json& value, const char* what) {
  if (value.is_string()) return Expr::parse(value.as_string(what));
  return Expr::constant(value.as_int(what));
}

std::vector<BufferSpec> buffers(const Json& list) {
  std::vector<BufferSpec> out;
  for (const Json& item : list.items("buffers")) {
    BufferSpec spec;
    spec.name = item["name"].as_string("buffer name");
    spec.dtype = item["dtype"].as_string("buffer dtype");
    dtype_size(spec.dtype);
    for (const Json& dim : item["shape"].items("buffer shape")) spec.shape.push_back(expression(dim, "dimension"));
    spec.zero = item.get("zero", Json::null()).kind() == Json::Kind::Bool && item["zero"].as_bool();
    out.push_back(std::move(spec));
  }
  return out;
}

int64_t numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// zlib's uncompress(), opened at first use like the CUDA driver: no link-time dependency.
using Uncompress = int (*)(unsigned char*, unsigned long*, const unsigned char*, unsigned long);

Uncompress uncompress_fn() {
  static Uncompress fn = [] {
    void* library = dlopen("libz.so.1", RTLD_NOW | RTLD_LOCAL);
    return library ? reinterpret_cast<Uncompress>(dlsym(library, "uncompress")) : nullptr;
  }();
  if (fn == nullptr) throw Error("zlib (libz.so.1) is needed to read the compressed kernels and was not found");
  return fn;
}

}  // namespace

std::shared_ptr<const Bundle> Bundle::parse(const void* data, size_t size) {
  const char* bytes = static_cast<const char*>(data);
  if (size < 16 || std::memcmp(bytes, kMagic, 8) != 0)
    throw Error("the kernels tensor is not a moexport kernel bundle (wrong magic bytes)");
  uint64_t length = 0;
  for (int i = 0; i < 8; ++i) length |= uint64_t(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
  if (length > size - 16) throw Error("the kernel bundle is truncated (manifest longer than the data)");
  auto bundle = std::make_shared<Bundle>();
  bundle->manifest_ = Json::parse(std::string(bytes + 16, length));
  const Json& m = bundle->manifest_;
  if (m["format"].as_int("format") != 1)
    throw Error(cat("kernel bundle format ", m["format"].as_int(), " is not known to this library (it reads "
                    "format 1); fuse the model again with this moexport, or update the library"));
  bundle->op_ = m["op"].as_string("op");
  bundle->key_ = m["key"].as_string("key");
  bundle->select_ = m["select"].as_string("select");
  for (const Json& name : m["op_inputs"].items("op_inputs")) bundle->input_names_.push_back(name.as_string());
  for (const Json& name : m["op_outputs"].items("op_outputs")) bundle->output_names_.push_back(name.as_string());
  bundle->bytes_.assign(bytes, bytes + size);
  bundle->blobs_ = 16 + length;
  const size_t blob_bytes = size - bundle->blobs_;

  for (const Json& k : m["kernels"].items("kernels")) {
    KernelSpec kernel;
    kernel.name = k["name"].as_string("kernel name");
    kernel.entry = k["entry"].as_string("kernel entry");
    for (const Json& i : k["images"].items("images")) {
      ImageSpec image;
      const std::string& target = i["target"].as_string("image target");
      if (target != "cubin" && target != "ptx") throw Error(cat("kernel bundle: unknown image target '", target, "'"));
      image.ptx = target == "ptx";
      image.sm = static_cast<int>(i["sm"].as_int("image sm"));
      image.offset = static_cast<size_t>(i["offset"].as_int("image offset"));
      image.size = static_cast<size_t>(i["size"].as_int("image size"));
      image.raw_size = static_cast<size_t>(i["raw_size"].as_int("image raw_size"));
      image.shared = static_cast<unsigned>(i["shared"].as_int("image shared"));
      image.hidden_pointers = static_cast<int>(i["hidden_pointers"].as_int("image hidden_pointers"));
      image.pdl = i["pdl"].as_bool("image pdl");
      if (image.offset > blob_bytes || image.size > blob_bytes - image.offset)
        throw Error(cat("the kernel bundle is truncated (kernel ", kernel.name, " lies beyond its end)"));
      kernel.images.push_back(image);
    }
    bundle->kernels_.push_back(std::move(kernel));
  }
  // what follows the last image is not the bundle's (a host may hand it over with a terminator)
  size_t end = 0;
  for (const auto& kernel : bundle->kernels_)
    for (const auto& image : kernel.images) end = std::max(end, image.offset + image.size);
  bundle->bytes_.resize(bundle->blobs_ + end);

  int64_t previous = 0;
  for (const Json& p : m["plans"].items("plans")) {
    PlanSpec plan;
    plan.max_tokens = p["max_tokens"].as_int("max_tokens");
    plan.unbounded = p["unbounded"].as_bool("unbounded");
    if (plan.max_tokens <= previous) throw Error("kernel bundle: plans must come in increasing max_tokens");
    previous = plan.max_tokens;
    plan.inputs = buffers(p["inputs"]);
    plan.outputs = buffers(p["outputs"]);
    plan.workspace = buffers(p["workspace"]);
    for (const Json& d : p["derived"].items("derived")) {
      const auto& pair = d.items("derived symbol");
      if (pair.size() != 2) throw Error("kernel bundle: a derived symbol must be [name, expression]");
      plan.derived.emplace_back(pair[0].as_string("symbol"), expression(pair[1], "derived expression"));
    }
    for (const Json& s : p["steps"].items("steps")) {
      StepSpec step;
      step.kernel = static_cast<size_t>(s["kernel"].as_int("step kernel"));
      if (step.kernel >= bundle->kernels_.size()) throw Error("kernel bundle: a step names a missing kernel");
      for (const Json& g : s["grid"].items("grid")) step.grid.push_back(expression(g, "grid"));
      const auto& block = s["block"].items("block");
      if (block.size() != 3) throw Error("kernel bundle: a block must have 3 dimensions");
      for (int i = 0; i < 3; ++i) step.block[i] = static_cast<unsigned>(block[i].as_int("block"));
      for (const Json& a : s["args"].items("args")) {
        ArgSpec arg;
        const std::string& kind = a["kind"].as_string("argument kind");
        arg.pointer = kind == "pointer";
        if (arg.pointer) arg.buffer = a["buffer"].as_string("argument buffer");
        else if (kind == "i32") arg.value = expression(a["value"], "argument value");
        else throw Error(cat("kernel bundle: unknown argument kind '", kind, "'"));
        step.args.push_back(std::move(arg));
      }
      step.launch_pdl = s["launch_pdl"].as_bool("launch_pdl");
      plan.steps.push_back(std::move(step));
    }
    bundle->plans_.push_back(std::move(plan));
  }
  if (bundle->plans_.empty()) throw Error("kernel bundle: no plans");
  return bundle;
}

std::string Bundle::targets() const {
  std::vector<std::string> seen;
  for (const auto& kernel : kernels_) {
    for (const auto& image : kernel.images) {
      std::string t = image.ptx ? cat("sm_", image.sm, image.sm >= 90 ? "" : "+", " (PTX)")
                                : cat("sm_", image.sm, " (cubin)");
      bool found = false;
      for (const auto& s : seen) found = found || s == t;
      if (!found) seen.push_back(t);
    }
  }
  std::string out;
  for (size_t i = 0; i < seen.size(); ++i) out += (i ? ", " : "") + seen[i];
  return out;
}

std::vector<char> Bundle::image_bytes(const ImageSpec& image) const {
  const char* start = bytes_.data() + blobs_ + image.offset;
  if (image.raw_size == image.size) return std::vector<char>(start, start + image.size);
  std::vector<char> out(image.raw_size);
  unsigned long length = image.raw_size;
  int status = uncompress_fn()(reinterpret_cast<unsigned char*>(out.data()), &length,
                               reinterpret_cast<const unsigned char*>(start), image.size);
  if (status != 0 || length != image.raw_size) throw Error("a kernel image of the bundle does not decompress");
  return out;
}

Symbols Bundle::bind(const PlanSpec& plan, const std::vector<TensorArg>& inputs) const {
  // which op input feeds each plan input, and no op input the kernels were compiled without
  std::vector<const TensorArg*> by_plan(plan.inputs.size(), nullptr);
  for (size_t i = 0; i < inputs.size() && i < input_names_.size(); ++i) {
    if (!inputs[i].present || input_names_[i].empty()) continue;
    bool used = false;
    for (size_t b = 0; b < plan.inputs.size(); ++b) {
      if (plan.inputs[b].name == input_names_[i]) {
        by_plan[b] = &inputs[i];
        used = true;
      }
    }
    if (!used)
      throw Error(cat("input '", input_names_[i], "' is given, but the compiled kernels were built without it; "
                      "fuse the model again (moexport fuse)"));
  }
  Symbols symbols;
  for (size_t b = 0; b < plan.inputs.size(); ++b) {
    const BufferSpec& spec = plan.inputs[b];
    const TensorArg* arg = by_plan[b];
    if (arg == nullptr)
      throw Error(cat("input '", spec.name, "' is missing; the compiled kernels need it"));
    if (arg->dtype != spec.dtype)
      throw Error(cat("input '", spec.name, "' is ", arg->dtype, "; the compiled kernels take ", spec.dtype));
    if (arg->shape.size() != spec.shape.size())
      throw Error(cat("input '", spec.name, "' of shape ", show(arg->shape), " must have ", spec.shape.size(),
                      " dimensions"));
    for (size_t d = 0; d < spec.shape.size(); ++d) {
      const std::string& symbol = spec.shape[d].bare_symbol();
      if (!symbol.empty() && !symbols.has(symbol)) symbols.set(symbol, arg->shape[d]);
    }
  }
  for (const auto& derived : plan.derived) symbols.set(derived.first, derived.second.eval(symbols));
  for (size_t b = 0; b < plan.inputs.size(); ++b) {
    Shape want;
    for (const Expr& e : plan.inputs[b].shape) want.push_back(e.eval(symbols));
    if (want != by_plan[b]->shape)
      throw Error(cat("input '", plan.inputs[b].name, "' has shape ", show(by_plan[b]->shape),
                      "; the compiled kernels expect ", show(want)));
  }
  return symbols;
}

Call Bundle::prepare(const std::vector<TensorArg>& inputs) const {
  int64_t tokens = bind(plans_.front(), inputs).get(select_);
  const PlanSpec* chosen = nullptr;
  for (const auto& plan : plans_) {
    if (tokens <= plan.max_tokens) {
      chosen = &plan;
      break;
    }
  }
  if (chosen == nullptr && plans_.back().unbounded) chosen = &plans_.back();
  if (chosen == nullptr)
    throw Error(cat(tokens, " tokens is more than the compiled kernels were built for (", plans_.back().max_tokens,
                    "); fuse the model again with a larger --max-tokens"));
  return prepare(*chosen, inputs);
}

Call Bundle::prepare(const PlanSpec& plan, const std::vector<TensorArg>& inputs) const {
  Call call;
  call.plan = &plan;
  call.symbols = bind(plan, inputs);
  for (const std::string& name : output_names_) {
    Shape shape;
    for (const auto& spec : plan.outputs)
      if (spec.name == name)
        for (const Expr& e : spec.shape) shape.push_back(e.eval(call.symbols));
    call.output_shapes.push_back(shape);
  }
  for (const auto& spec : plan.workspace) {
    Shape shape;
    for (const Expr& e : spec.shape) shape.push_back(e.eval(call.symbols));
    call.workspace_offsets.push_back(call.workspace_bytes);
    call.workspace_bytes += round_up(static_cast<size_t>(numel(shape)) * dtype_size(spec.dtype), kWorkspaceAlign);
  }
  return call;
}

// ---- launching ---------------------------------------------------------------------------------

Launcher::Launcher(std::shared_ptr<const Bundle> bundle) : bundle_(std::move(bundle)) {}

Launcher::~Launcher() {
  // Modules go with their context; a context already destroyed at exit must not be touched, so only
  // unload while the driver is still loaded and the context current-able (best effort, no throw).
  try {
    const cuda::Api& api = cuda::api();
    for (auto& loaded : loaded_) {
      if (api.ctx_push_current(loaded->context) != 0) continue;
      for (cuda::Module module : loaded->modules) api.module_unload(module);
      cuda::Context ignored;
      api.ctx_pop_current(&ignored);
    }
  } catch (...) {
  }
}

void Launcher::load(cuda::Stream stream) { loaded_for(stream); }

Launcher::Loaded& Launcher::loaded_for(cuda::Stream stream) {
  const cuda::Api& api = cuda::api();
  cuda::Context context = nullptr;
  if (stream != nullptr) cuda::check(api.stream_get_ctx(stream, &context), "cuStreamGetCtx");
  else cuda::check(api.ctx_get_current(&context), "cuCtxGetCurrent");
  if (context == nullptr) throw Error("no CUDA context is current and the stream names none");
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& loaded : loaded_)
    if (loaded->context == context) return *loaded;
  loaded_.push_back(load_context(context));
  return *loaded_.back();
}

namespace {

// The image of a kernel for a GPU of compute capability `sm`: its own cubin; a cubin of an earlier
// minor version of the same major (binary compatible, except the arch-specific sm_90a and later, which
// Triton emits from sm_90 on); else PTX the driver compiles (generic PTX for any newer GPU).
const ImageSpec* choose(const KernelSpec& kernel, int sm) {
  const ImageSpec* best = nullptr;
  for (const auto& image : kernel.images)
    if (!image.ptx && image.sm == sm) return &image;
  for (const auto& image : kernel.images)
    if (!image.ptx && image.sm < 90 && image.sm / 10 == sm / 10 && image.sm <= sm && (!best || image.sm > best->sm))
      best = &image;
  if (best) return best;
  for (const auto& image : kernel.images)
    if (image.ptx && (image.sm >= 90 ? image.sm == sm : image.sm <= sm) && (!best || image.sm > best->sm))
      best = &image;
  return best;
}

class CurrentContext {  // makes `context` current for a scope
 public:
  explicit CurrentContext(cuda::Context context) {
    cuda::check(cuda::api().ctx_push_current(context), "cuCtxPushCurrent");
  }
  ~CurrentContext() {
    cuda::Context ignored;
    cuda::api().ctx_pop_current(&ignored);
  }
};

class RelaxedCapture {  // module loading is not allowed while a stream captures in global mode
 public:
  RelaxedCapture() : mode_(cuda::kStreamCaptureModeRelaxed) {
    cuda::api().thread_exchange_stream_capture_mode(&mode_);
  }
  ~RelaxedCapture() { cuda::api().thread_exchange_stream_capture_mode(&mode_); }

 private:
  int mode_;
};

}  // namespace

std::unique_ptr<Launcher::Loaded> Launcher::load_context(cuda::Context context) {
  const cuda::Api& api = cuda::api();
  CurrentContext current(context);
  RelaxedCapture relaxed;
  cuda::Device device = 0;
  int major = 0, minor = 0, smem_optin = 0;
  cuda::check(api.ctx_get_device(&device), "cuCtxGetDevice");
  cuda::check(api.device_get_attribute(&major, cuda::kDeviceAttributeComputeCapabilityMajor, device), "cuDeviceGetAttribute");
  cuda::check(api.device_get_attribute(&minor, cuda::kDeviceAttributeComputeCapabilityMinor, device), "cuDeviceGetAttribute");
  cuda::check(api.device_get_attribute(&smem_optin, cuda::kDeviceAttributeMaxSharedMemoryPerBlockOptin, device),
              "cuDeviceGetAttribute");
  auto loaded = std::make_unique<Loaded>();
  loaded->context = context;
  loaded->sm = major * 10 + minor;
  try {
    for (const KernelSpec& kernel : bundle_->kernels()) {
      const ImageSpec* image = choose(kernel, loaded->sm);
      if (image == nullptr)
        throw Error(cat("this GPU (sm_", loaded->sm, ") has no kernels in the file: it carries ", bundle_->targets(),
                        "; fuse the model again with `moexport fuse --arch ", loaded->sm, "`"));
      if (image->shared > static_cast<unsigned>(smem_optin))
        throw Error(cat("kernel ", kernel.name, " needs ", image->shared, " bytes of shared memory; this GPU (sm_",
                        loaded->sm, ") offers ", smem_optin));
      std::vector<char> bytes = bundle_->image_bytes(*image);
      if (image->ptx) bytes.push_back('\0');  // the driver reads PTX as a C string
      cuda::Module module = nullptr;
      cuda::check(api.module_load_data(&module, bytes.data()), cat("loading kernel ", kernel.name).c_str());
      loaded->modules.push_back(module);
      cuda::Function function = nullptr;
      cuda::check(api.module_get_function(&function, module, kernel.entry.c_str()), "cuModuleGetFunction");
      if (image->shared > 48 * 1024)
        cuda::check(api.func_set_attribute(function, cuda::kFuncAttributeMaxDynamicSharedSizeBytes,
                                           static_cast<int>(image->shared)),
                    "cuFuncSetAttribute");
      loaded->functions.push_back(function);
      loaded->images.push_back(image);
    }
  } catch (...) {
    for (cuda::Module module : loaded->modules) api.module_unload(module);
    throw;
  }
  return loaded;
}

void Launcher::launch(const Call& call, const std::vector<const void*>& inputs, const std::vector<void*>& outputs,
                      void* workspace, cuda::Stream stream) {
  Loaded& loaded = loaded_for(stream);
  const cuda::Api& api = cuda::api();
  const PlanSpec& plan = *call.plan;
  // device pointer of every plan buffer, by name (a plan has a dozen at most)
  std::vector<std::pair<const std::string*, uint64_t>> pointers;
  auto add = [&](const std::string& name, const void* p) { pointers.emplace_back(&name, reinterpret_cast<uint64_t>(p)); };
  const auto& in_names = bundle_->input_names();
  for (size_t i = 0; i < inputs.size() && i < in_names.size(); ++i)
    if (!in_names[i].empty()) add(in_names[i], inputs[i]);
  const auto& out_names = bundle_->output_names();
  for (size_t i = 0; i < outputs.size() && i < out_names.size(); ++i)
    if (!out_names[i].empty()) add(out_names[i], outputs[i]);
  for (size_t w = 0; w < plan.workspace.size(); ++w)
    add(plan.workspace[w].name, static_cast<char*>(workspace) + call.workspace_offsets[w]);
  auto pointer = [&](const std::string& name) -> uint64_t {
    for (const auto& entry : pointers)
      if (*entry.first == name) return entry.second;
    throw Error(cat("kernel bundle: a step reads the buffer '", name, "', which the call does not provide"));
  };

  auto zero = [&](const BufferSpec& spec) {
    int64_t n = static_cast<int64_t>(dtype_size(spec.dtype));
    for (const Expr& e : spec.shape) n *= e.eval(call.symbols);
    if (n > 0)
      cuda::check(api.memset_d8_async(pointer(spec.name), 0, static_cast<size_t>(n), stream), "cuMemsetD8Async");
  };
  for (const auto& spec : plan.outputs)
    if (spec.zero) zero(spec);
  for (const auto& spec : plan.workspace)
    if (spec.zero) zero(spec);
  // a call without tokens (or rows) launches nothing, as in the Python host: some grids do not
  // depend on the token count
  for (const char* count : {"N", "S"})
    if (call.symbols.has(count) && call.symbols.get(count) <= 0) return;

  std::vector<uint64_t> values;
  std::vector<void*> params;
  for (const StepSpec& step : plan.steps) {
    unsigned grid[3] = {1, 1, 1};
    bool empty = false;
    for (size_t d = 0; d < step.grid.size() && d < 3; ++d) {
      int64_t g = step.grid[d].eval(call.symbols);
      empty = empty || g <= 0;
      grid[d] = static_cast<unsigned>(g > 0 ? g : 0);
    }
    if (empty) continue;
    const ImageSpec& image = *loaded.images[step.kernel];
    values.assign(step.args.size() + image.hidden_pointers, 0);  // scratch pointers stay null
    params.clear();
    for (size_t a = 0; a < step.args.size(); ++a) {
      const ArgSpec& arg = step.args[a];
      if (arg.pointer) {
        values[a] = pointer(arg.buffer);
      } else {
        int32_t v = static_cast<int32_t>(arg.value.eval(call.symbols));
        std::memcpy(&values[a], &v, sizeof v);  // a 32-bit parameter: the driver reads 4 bytes
      }
    }
    for (auto& v : values) params.push_back(&v);
    cuda::LaunchAttribute pdl{};
    pdl.id = cuda::kLaunchAttributeProgrammaticStreamSerialization;
    pdl.value.programmatic_stream_serialization_allowed = 1;
    cuda::LaunchConfig config{grid[0], grid[1], grid[2], step.block[0], step.block[1], step.block[2],
                              image.shared, stream, nullptr, 0};
    if (step.launch_pdl && image.pdl && loaded.sm >= 90) {
      config.attrs = &pdl;
      config.num_attrs = 1;
    }
    cuda::check(api.launch_kernel_ex(&config, loaded.functions[step.kernel], params.data(), nullptr),
                "launching a σ-MoE kernel");
  }
}

}  // namespace moexport
