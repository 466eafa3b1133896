#include "ops.h"

#include <cstdlib>
#include <map>
#include <mutex>

#include "error.h"

namespace moexport {

const OpSpec kSigmaMoE{"SigmaMoE",
                       {{"x", "T", false}, {"expert_sel", "R", false}, {"keys", "T", false},
                        {"values", "T", false}, {"bias", "T", true}, {"o_bias", "T", true}},
                       {{"y", "T", false}, {"expert", "int64", true}},
                       {{"k", nullptr, 1}, {"selection", "sigmoid", 0}, {"activation", "relu", 0}},
                       true};
const OpSpec kTopKDispatch{"TopKDispatch",
                           {{"logits", "float32", false}},
                           {{"gate", "float32", false}, {"expert", "int32", false}, {"sorted_expert", "int32", false},
                            {"sorted_slot", "int32", false}},
                           {{"k", nullptr, 1}, {"selection", "sigmoid", 0}},
                           false};
const OpSpec kCVMM{"CVMM",
                   {{"x", "T", false}, {"sorted_expert", "int32", false}, {"src_row", "int32", false},
                    {"dst_row", "int32", false}, {"W", "T", false}, {"gate", "float32", true}},
                   {{"out", "float32", false}},
                   {{"reduce", nullptr, 0}, {"k", nullptr, 1}},
                   false};

const std::vector<const OpSpec*>& op_specs() {
  static const std::vector<const OpSpec*> specs{&kSigmaMoE, &kTopKDispatch, &kCVMM};
  return specs;
}

const OpSpec* find_op(const std::string& name) {
  for (const OpSpec* op : op_specs())
    if (name == op->name) return op;
  return nullptr;
}

namespace {

// The values the op set allows (moexport.models.routing.SELECTIONS, moexport.models.activations.ACTIVATIONS;
// tests/trt_plugins compares them).
const std::vector<std::string> kChoices[] = {{"selection", "sigmoid", "softmax", "softmax_after_topk"},
                                             {"activation", "relu", "gelu", "silu"},
                                             {"reduce", "0", "1"}};

std::string config_text(const Json& value) {
  if (value.is_string()) return value.as_string();
  if (value.kind() == Json::Kind::Bool) return value.as_bool() ? "1" : "0";
  return std::to_string(value.as_int());
}

void check_valid(const std::string& name, const std::string& value, const Bundle& bundle) {
  if (name == "k") {
    char* end = nullptr;
    long long k = std::strtoll(value.c_str(), &end, 10);
    if (value.empty() || *end != '\0' || k < 1) throw Error(cat("has k=", value, "; k must be at least 1"));
    const Json& experts = bundle.config().get("n_experts", Json::null());
    if (!experts.is_null() && k > experts.as_int())
      throw Error(cat("has k=", value, ", more than its ", experts.as_int(), " experts"));
    return;
  }
  for (const auto& choices : kChoices) {
    if (choices[0] != name) continue;
    std::string allowed;
    for (size_t i = 1; i < choices.size(); ++i) {
      if (choices[i] == value) return;
      allowed += (i > 1 ? ", " : "") + choices[i];
    }
    throw Error(cat("has ", name, "='", value, "', which is not one of ", allowed));
  }
}

}  // namespace

void check_node(const OpSpec& op, const Bundle& bundle, const AttributeReader& attribute, size_t outputs) {
  if (bundle.op() != op.name) throw Error(cat("its kernels are those of a ", bundle.op(), " node"));
  for (const AttributeSpec& spec : op.attributes) {
    std::string value = attribute(spec);
    check_valid(spec.name, value, bundle);
    std::string compiled = config_text(bundle.config()[spec.name]);
    if (value != compiled)
      throw Error(cat("has ", spec.name, "=", value, " but its kernels were compiled for ", spec.name, "=", compiled,
                      ": fuse the model again"));
  }
  const auto& names = bundle.output_names();
  for (size_t o = 0; o < outputs && o < op.outputs.size(); ++o)
    if (o >= names.size() || names[o].empty())
      throw Error(cat("asks for output '", op.outputs[o].name, "', which its kernels were compiled without: "
                      "fuse the model again"));
}

namespace {

std::mutex g_registry_mutex;
std::map<std::string, std::weak_ptr<Launcher>> g_registry;  // by bundle key; held by the nodes using them

}  // namespace

std::shared_ptr<Launcher> shared_launcher(const void* data, size_t size) {
  auto bundle = Bundle::parse(data, size);
  std::lock_guard<std::mutex> lock(g_registry_mutex);
  std::shared_ptr<Launcher> launcher = g_registry[bundle->key()].lock();
  if (!launcher) {
    launcher = std::make_shared<Launcher>(bundle);
    g_registry[bundle->key()] = launcher;
  }
  return launcher;
}

std::shared_ptr<Launcher> find_launcher(const std::string& key) {
  std::lock_guard<std::mutex> lock(g_registry_mutex);
  auto found = g_registry.find(key);
  return found == g_registry.end() ? nullptr : found->second.lock();
}

namespace {

// SigmaMoE's x [..., d] as the kernels' rows [N, d]; returns x's leading dimensions.
Shape as_rows(const OpSpec& op, std::vector<TensorArg>& inputs) {
  Shape lead;
  if (!op.rows || inputs.empty() || !inputs[0].present) return lead;
  Shape& x = inputs[0].shape;
  if (x.empty()) throw Error("input 'x' must have at least one dimension [..., d]");
  lead.assign(x.begin(), x.end() - 1);
  int64_t rows = 1;
  for (int64_t d : lead) rows *= d;
  x = {rows, x.back()};
  return lead;
}

}  // namespace

OpCall plan_op(const OpSpec& op, const Bundle& bundle, std::vector<TensorArg> inputs) {
  Shape lead = as_rows(op, inputs);
  OpCall out{bundle.prepare(inputs), {}};
  for (const Shape& shape : out.call.output_shapes) {
    if (!op.rows || shape.empty()) {
      out.output_shapes.push_back(shape);
      continue;
    }
    Shape full = lead;
    full.push_back(shape.back());
    out.output_shapes.push_back(full);
  }
  return out;
}

size_t workspace_bound(const OpSpec& op, const Bundle& bundle, std::vector<TensorArg> largest) {
  as_rows(op, largest);
  const PlanSpec* chosen = bundle.prepare(largest).plan;
  size_t bound = 0;
  for (const PlanSpec& plan : bundle.plans()) {
    size_t bytes = bundle.prepare(plan, largest).workspace_bytes;
    bound = bytes > bound ? bytes : bound;
    if (&plan == chosen) break;  // later plans serve only more tokens than these inputs have
  }
  return bound;
}

size_t output_count(const Bundle& bundle) {
  const auto& names = bundle.output_names();
  size_t count = 0;
  for (size_t o = 0; o < names.size(); ++o)
    if (!names[o].empty()) count = o + 1;
  return count;
}

}  // namespace moexport
