// The expressions of launch plans (moexport/kernels/plan.py): integers, + - * // ( ), cdiv(a, b),
// min(a, b), max(a, b) over named symbols such as the token count N. Parsed once when a bundle is
// loaded, evaluated at every call with Python's semantics (// floors).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace moexport {

// Symbol values by name; plans have a handful, so a flat list beats a map.
class Symbols {
 public:
  void set(const std::string& name, int64_t value);
  bool has(const std::string& name) const;
  int64_t get(const std::string& name) const;  // throws Error when unknown
  const std::vector<std::pair<std::string, int64_t>>& all() const { return values_; }

 private:
  std::vector<std::pair<std::string, int64_t>> values_;
};

class Expr {
 public:
  Expr() = default;
  static Expr parse(const std::string& text);  // throws Error
  static Expr constant(int64_t value);

  int64_t eval(const Symbols& symbols) const;
  // The symbol name when the expression is one bare symbol (how shapes bind symbols), else "".
  const std::string& bare_symbol() const { return bare_; }
  const std::string& text() const { return text_; }

  // The parsed tree, for hosts that evaluate it over something else than integers (TensorRT's
  // symbolic dimensions); eval() is its meaning.
  struct Node {
    enum class Op { Constant, Symbol, Add, Sub, Mul, FloorDiv, Neg, Cdiv, Min, Max } op;
    int64_t value = 0;  // Constant
    std::string name;   // Symbol
    std::shared_ptr<const Node> a, b;
  };
  const Node& root() const;

 private:
  std::shared_ptr<const Node> root_;
  std::string bare_;
  std::string text_;
};

int64_t floor_div(int64_t a, int64_t b);  // throws Error on b == 0

}  // namespace moexport
