// Kernel bundles: the compiled kernels of one moexport op configuration (moexport/kernels/bundle.py
// writes them), and the launcher that runs them on a caller's CUDA stream. One implementation for
// every host: the ONNX Runtime op library and the TensorRT plugins.
//
// A bundle holds launch plans for token-count buckets (each valid up to its `max_tokens`; the last one,
// where `unbounded`, for any count), the plans' buffers and steps with their shape expressions, and
// per kernel one image per GPU target (cubins, and PTX the driver compiles for newer GPUs).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_driver.h"
#include "expr.h"
#include "json.h"

namespace moexport {

using Shape = std::vector<int64_t>;

// One tensor of a call as the host sees it; absent optional inputs have present == false.
struct TensorArg {
  bool present = false;
  std::string dtype;  // "float32", "float16", "bfloat16", "int32", "int64"
  Shape shape;
};

struct BufferSpec {
  std::string name;
  std::string dtype;
  std::vector<Expr> shape;
  bool zero = false;  // filled with zeros before the first step
};

struct ArgSpec {
  bool pointer = false;
  std::string buffer;  // a pointer argument: the buffer's name
  Expr value;          // an int32 argument
};

struct StepSpec {
  size_t kernel = 0;  // index into Bundle::kernels()
  std::vector<Expr> grid;
  std::array<unsigned, 3> block{1, 1, 1};
  std::vector<ArgSpec> args;
  bool launch_pdl = false;  // may start while the step before runs (it waits for its results itself)
};

struct PlanSpec {
  int64_t max_tokens = 0;
  bool unbounded = false;
  std::vector<BufferSpec> inputs, outputs, workspace;
  std::vector<std::pair<std::string, Expr>> derived;
  std::vector<StepSpec> steps;
};

struct ImageSpec {
  bool ptx = false;  // else a cubin
  int sm = 0;        // compute capability as major * 10 + minor
  size_t offset = 0, size = 0, raw_size = 0;  // in the blob section; raw_size != size: zlib-compressed
  unsigned shared = 0;
  int hidden_pointers = 0;  // Triton's scratch pointers after the arguments, passed as null
  bool pdl = false;         // built with the PDL instructions: its steps may launch with the attribute
};

struct KernelSpec {
  std::string name, entry;
  std::vector<ImageSpec> images;
};

// What one call needs: the plan chosen for its token count, the symbols read off its input shapes,
// the output shapes (by op output) and the workspace layout.
struct Call {
  const PlanSpec* plan = nullptr;
  Symbols symbols;
  std::vector<Shape> output_shapes;
  std::vector<size_t> workspace_offsets;  // by plan workspace buffer
  size_t workspace_bytes = 0;
};

class Bundle {
 public:
  static constexpr const char* kMagic = "MOEXKB01";
  static constexpr size_t kWorkspaceAlign = 256;  // as moexport.kernels.host lays the workspace out

  // Parses (and copies) a bundle; throws Error naming what is wrong with it.
  static std::shared_ptr<const Bundle> parse(const void* data, size_t size);

  const std::string& op() const { return op_; }
  const std::string& key() const { return key_; }
  const Json& config() const { return manifest_["config"]; }
  const std::vector<KernelSpec>& kernels() const { return kernels_; }
  const std::vector<PlanSpec>& plans() const { return plans_; }
  // The op's inputs and outputs in order, each the name of a plan buffer or "" (not used by the plans).
  const std::vector<std::string>& input_names() const { return input_names_; }
  const std::vector<std::string>& output_names() const { return output_names_; }
  // "sm_90 (cubin), sm_80 (cubin), sm_80+ (PTX)": for error messages.
  std::string targets() const;

  // Chooses the plan and sizes a call from its inputs (by op input). Throws Error naming the input
  // whose presence, dtype or shape does not fit, or a token count beyond every plan.
  Call prepare(const std::vector<TensorArg>& inputs) const;
  // Sizes a call of `plan` (one of plans()) from its inputs, whatever their token count.
  Call prepare(const PlanSpec& plan, const std::vector<TensorArg>& inputs) const;

  // The bundle as it was given (what a host serialises with its node).
  const std::vector<char>& bytes() const { return bytes_; }

  // The (decompressed) bytes of one image.
  std::vector<char> image_bytes(const ImageSpec& image) const;

 private:
  Json manifest_;
  std::string op_, key_, select_;
  std::vector<std::string> input_names_, output_names_;
  std::vector<KernelSpec> kernels_;
  std::vector<PlanSpec> plans_;
  std::vector<char> bytes_;
  size_t blobs_ = 0;  // where the images start in bytes_

  Symbols bind(const PlanSpec& plan, const std::vector<TensorArg>& inputs) const;
};

// Runs a bundle's plans on CUDA streams: loads each kernel's image for the stream's GPU once per CUDA
// context (cubin for its architecture, else PTX), then launches the plan's steps in order.
class Launcher {
 public:
  explicit Launcher(std::shared_ptr<const Bundle> bundle);
  ~Launcher();
  Launcher(const Launcher&) = delete;
  Launcher& operator=(const Launcher&) = delete;

  const Bundle& bundle() const { return *bundle_; }

  // Loads the kernels for the stream's context now (a host may do this before CUDA-graph capture).
  void load(cuda::Stream stream);

  // Launches `call` on `stream`: inputs and outputs by op index (device pointers; absent ones null),
  // `workspace` of at least call.workspace_bytes bytes (256-byte aligned).
  void launch(const Call& call, const std::vector<const void*>& inputs, const std::vector<void*>& outputs,
              void* workspace, cuda::Stream stream);

 private:
  struct Loaded {
    cuda::Context context = nullptr;
    int sm = 0;
    std::vector<cuda::Module> modules;
    std::vector<cuda::Function> functions;      // by kernel
    std::vector<const ImageSpec*> images;       // by kernel
  };
  std::shared_ptr<const Bundle> bundle_;
  std::mutex mutex_;
  std::vector<std::unique_ptr<Loaded>> loaded_;

  Loaded& loaded_for(cuda::Stream stream);
  std::unique_ptr<Loaded> load_context(cuda::Context context);
};

size_t dtype_size(const std::string& dtype);  // throws Error for an unknown dtype

}  // namespace moexport
