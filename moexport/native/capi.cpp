// A C entry point into the launcher's planning half, exported by both plugin libraries, so that the
// tests (and `moexport inspect`) can check plan choice, shape checks, symbols and the workspace layout
// against the Python host on a machine without a GPU. Nothing here touches CUDA.
#include <cstring>
#include <string>

#include "bundle.h"
#include "error.h"
#include "json.h"

namespace {

std::string quote(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      out += ' ';
      continue;
    }
    out += c;
  }
  return out + "\"";
}

std::string list(const std::vector<int64_t>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? "," : "") + std::to_string(values[i]);
  return out + "]";
}

std::string describe(const void* data, size_t size, const char* inputs_json) {
  using namespace moexport;
  auto bundle = Bundle::parse(data, size);
  std::vector<TensorArg> inputs;
  const Json request = Json::parse(inputs_json);
  for (const Json& item : request.items("inputs")) {
    TensorArg arg;
    arg.present = !item.is_null();
    if (arg.present) {
      arg.dtype = item["dtype"].as_string("dtype");
      for (const Json& d : item["shape"].items("shape")) arg.shape.push_back(d.as_int("dimension"));
    }
    inputs.push_back(arg);
  }
  Call call = bundle->prepare(inputs);
  size_t index = static_cast<size_t>(call.plan - bundle->plans().data());
  std::string out = "{\"op\":" + quote(bundle->op()) + ",\"key\":" + quote(bundle->key()) +
                    ",\"targets\":" + quote(bundle->targets()) + ",\"plan\":" + std::to_string(index) + ",\"symbols\":{";
  const auto& symbols = call.symbols.all();
  for (size_t i = 0; i < symbols.size(); ++i)
    out += (i ? "," : "") + quote(symbols[i].first) + ":" + std::to_string(symbols[i].second);
  out += "},\"outputs\":[";
  for (size_t i = 0; i < call.output_shapes.size(); ++i) out += (i ? "," : "") + list(call.output_shapes[i]);
  out += "],\"workspace\":[";
  for (size_t w = 0; w < call.plan->workspace.size(); ++w)
    out += (w ? "," : "") + std::string("[") + quote(call.plan->workspace[w].name) + "," +
           std::to_string(call.workspace_offsets[w]) + "]";
  out += "],\"workspace_bytes\":" + std::to_string(call.workspace_bytes) + ",\"steps\":[";
  for (size_t s = 0; s < call.plan->steps.size(); ++s) {
    const StepSpec& step = call.plan->steps[s];
    std::vector<int64_t> grid, ints;
    for (const Expr& g : step.grid) grid.push_back(g.eval(call.symbols));
    for (const ArgSpec& arg : step.args)
      if (!arg.pointer) ints.push_back(arg.value.eval(call.symbols));
    out += (s ? "," : "") + std::string("{\"kernel\":") + quote(bundle->kernels()[step.kernel].name) +
           ",\"grid\":" + list(grid) + ",\"ints\":" + list(ints) + "}";
  }
  return out + "]}";
}

}  // namespace

extern "C" {

// Plans a call of the bundle `data` for inputs given as JSON (by op input: null, or {"dtype": ..,
// "shape": [..]}) and writes a JSON description (or {"error": "..."}) into `out`. Returns the length
// of the full answer: when it is >= out_size, call again with a larger buffer.
__attribute__((visibility("default"))) size_t moexport_plan_call(const void* data, size_t size,
                                                                 const char* inputs_json, char* out,
                                                                 size_t out_size) {
  std::string answer;
  try {
    answer = describe(data, size, inputs_json);
  } catch (const std::exception& error) {
    answer = "{\"error\":" + quote(error.what()) + "}";
  }
  if (out_size > 0) {
    size_t n = answer.size() < out_size - 1 ? answer.size() : out_size - 1;
    std::memcpy(out, answer.data(), n);
    out[n] = '\0';
  }
  return answer.size();
}

}  // extern "C"
