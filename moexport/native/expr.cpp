#include "expr.h"

#include <cctype>
#include <initializer_list>

#include "error.h"

namespace moexport {

void Symbols::set(const std::string& name, int64_t value) {
  for (auto& entry : values_) {
    if (entry.first == name) {
      entry.second = value;
      return;
    }
  }
  values_.emplace_back(name, value);
}

bool Symbols::has(const std::string& name) const {
  for (const auto& entry : values_)
    if (entry.first == name) return true;
  return false;
}

int64_t Symbols::get(const std::string& name) const {
  for (const auto& entry : values_)
    if (entry.first == name) return entry.second;
  throw Error(cat("plan expression uses the unknown symbol '", name, "'"));
}

int64_t floor_div(int64_t a, int64_t b) {
  if (b == 0) throw Error("plan expression divides by zero");
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

namespace {

using NodePtr = std::shared_ptr<const Expr::Node>;
using Op = Expr::Node::Op;

NodePtr make(Op op, NodePtr a = nullptr, NodePtr b = nullptr) {
  auto node = std::make_shared<Expr::Node>();
  node->op = op;
  node->a = std::move(a);
  node->b = std::move(b);
  return node;
}

class Parser {
 public:
  explicit Parser(const std::string& text) : text_(text) {}

  NodePtr whole() {
    NodePtr node = sum();
    skip();
    if (pos_ != text_.size()) fail("unexpected character");
    return node;
  }

 private:
  const std::string& text_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const char* problem) const {
    throw Error(cat("plan expression '", text_, "': ", problem, " at character ", pos_));
  }

  void skip() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }

  bool accept(const char* token) {
    skip();
    size_t n = std::char_traits<char>::length(token);
    if (text_.compare(pos_, n, token) != 0) return false;
    pos_ += n;
    return true;
  }

  NodePtr sum() { return left_to_right(&Parser::product, {{"+", Op::Add}, {"-", Op::Sub}}); }

  NodePtr product() { return left_to_right(&Parser::unary, {{"//", Op::FloorDiv}, {"*", Op::Mul}}); }

  // operand (op operand)*, grouped from the left, for the operators of one precedence level
  NodePtr left_to_right(NodePtr (Parser::*operand)(), std::initializer_list<std::pair<const char*, Op>> ops) {
    NodePtr node = (this->*operand)();
    for (bool more = true; more;) {
      more = false;
      for (const auto& [token, op] : ops) {
        if (accept(token)) {
          node = make(op, node, (this->*operand)());
          more = true;
          break;
        }
      }
    }
    return node;
  }

  NodePtr unary() {
    if (accept("-")) return make(Op::Neg, unary());
    if (accept("+")) return unary();
    return primary();
  }

  NodePtr primary() {
    skip();
    if (accept("(")) {
      NodePtr node = sum();
      if (!accept(")")) fail("expected ')'");
      return node;
    }
    if (pos_ < text_.size() && std::isdigit(static_cast<unsigned char>(text_[pos_]))) {
      auto node = std::make_shared<Expr::Node>();
      node->op = Op::Constant;
      while (pos_ < text_.size() && std::isdigit(static_cast<unsigned char>(text_[pos_]))) {
        node->value = node->value * 10 + (text_[pos_++] - '0');
        if (node->value > (int64_t{1} << 53)) fail("integer too large");
      }
      return node;
    }
    std::string name;
    while (pos_ < text_.size() && (std::isalnum(static_cast<unsigned char>(text_[pos_])) || text_[pos_] == '_'))
      name.push_back(text_[pos_++]);
    if (name.empty()) fail("expected a number, a symbol or '('");
    if (accept("(")) {
      Op op;
      if (name == "cdiv") op = Op::Cdiv;
      else if (name == "min") op = Op::Min;
      else if (name == "max") op = Op::Max;
      else fail("unknown function (cdiv, min and max are known)");
      NodePtr a = sum();
      if (!accept(",")) fail("expected ','");
      NodePtr b = sum();
      if (!accept(")")) fail("expected ')'");
      return make(op, a, b);
    }
    auto node = std::make_shared<Expr::Node>();
    node->op = Op::Symbol;
    node->name = name;
    return node;
  }
};

int64_t eval_node(const Expr::Node& node, const Symbols& symbols) {
  switch (node.op) {
    case Op::Constant: return node.value;
    case Op::Symbol: return symbols.get(node.name);
    case Op::Neg: return -eval_node(*node.a, symbols);
    default: break;
  }
  int64_t a = eval_node(*node.a, symbols), b = eval_node(*node.b, symbols);
  switch (node.op) {
    case Op::Add: return a + b;
    case Op::Sub: return a - b;
    case Op::Mul: return a * b;
    case Op::FloorDiv: return floor_div(a, b);
    case Op::Cdiv: return -floor_div(-a, b);
    case Op::Min: return a < b ? a : b;
    case Op::Max: return a > b ? a : b;
    default: return 0;
  }
}

}  // namespace

Expr Expr::parse(const std::string& text) {
  Expr expr;
  expr.text_ = text;
  expr.root_ = Parser(text).whole();
  if (expr.root_->op == Op::Symbol) expr.bare_ = expr.root_->name;
  return expr;
}

Expr Expr::constant(int64_t value) {
  Expr expr;
  auto node = std::make_shared<Node>();
  node->op = Op::Constant;
  node->value = value;
  expr.root_ = node;
  expr.text_ = std::to_string(value);
  return expr;
}

const Expr::Node& Expr::root() const {
  if (!root_) throw Error("empty plan expression");
  return *root_;
}

int64_t Expr::eval(const Symbols& symbols) const { return eval_node(root(), symbols); }

}  // namespace moexport
