// The moexport op set as every host sees it (the contract of moexport/opset/schemas.py): each op's
// inputs, outputs and attributes, and what the ONNX Runtime op library and the TensorRT plugins do
// alike with a node and its kernels: check the node against them, share one launcher between the
// nodes of a configuration, view SigmaMoE's x [..., d] as rows, plan a call, bound its workspace.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "bundle.h"

namespace moexport {

struct Port {
  const char* name;
  // "T": the op's float type, which the kernels fix; "R": float32 or T (SigmaMoE's router weight; the
  // kernels fix which); else the one element type
  const char* dtype;
  bool optional;
};

// An attribute the kernels were compiled for, with the op set's default for a node without it.
struct AttributeSpec {
  const char* name;
  const char* string_default;  // nullptr: an integer attribute
  int64_t int_default;
};

struct OpSpec {
  const char* name;
  std::vector<Port> inputs;  // without the last input 'kernels' (the bundle), which hosts read apart
  std::vector<Port> outputs;
  std::vector<AttributeSpec> attributes;
  bool rows;  // the first input x [..., d] runs as rows [N, d]; the outputs keep x's leading dimensions
};

extern const OpSpec kSigmaMoE, kTopKDispatch, kCVMM;
const std::vector<const OpSpec*>& op_specs();
const OpSpec* find_op(const std::string& name);  // nullptr for a name outside the op set

// A node's attribute value as text ("3", "softmax"), given the spec; hosts return the default for an
// attribute the node does not have.
using AttributeReader = std::function<std::string(const AttributeSpec&)>;

// Checks a node's attributes (each valid, and as its kernels were compiled) and the outputs it asks
// for (`outputs`: how many). Throws Error with the problem, e.g. "has k=3 but its kernels were
// compiled for k=2: fuse the model again"; hosts prefix where it happened.
void check_node(const OpSpec& op, const Bundle& bundle, const AttributeReader& attribute, size_t outputs);

// The launcher of a bundle, shared by every node (and plugin) of the process whose kernels have the
// same key: parsed once, its kernels loaded once per CUDA context. Throws Error for a bad bundle.
std::shared_ptr<Launcher> shared_launcher(const void* data, size_t size);
// The shared launcher of a key another node brought in, or nullptr while there is none.
std::shared_ptr<Launcher> find_launcher(const std::string& key);

// A call of an op as its host sees it: the kernels' call, and the op's output shapes (SigmaMoE's
// with x's leading dimensions).
struct OpCall {
  Call call;
  std::vector<Shape> output_shapes;
};

// Plans a call from the op's inputs (absent ones not present). Throws Error naming the input at fault.
OpCall plan_op(const OpSpec& op, const Bundle& bundle, std::vector<TensorArg> inputs);

// Workspace bytes enough for any call whose inputs are at most `largest` (by op input): the largest
// layout of every plan the call could take, each sized for those inputs (layouts grow with the
// token count). Throws Error as plan_op does.
size_t workspace_bound(const OpSpec& op, const Bundle& bundle, std::vector<TensorArg> largest);

// How many outputs a node of this bundle has: up to the last one its kernels write.
size_t output_count(const Bundle& bundle);

}  // namespace moexport
