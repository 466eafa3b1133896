#include "json.h"

#include <cmath>
#include <cstdlib>

#include "error.h"

namespace moexport {

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : text_(text) {}

  Json document() {
    Json value = parse_value(0);
    skip_space();
    if (pos_ != text_.size()) fail("trailing characters after the document");
    return value;
  }

 private:
  static constexpr int kMaxDepth = 64;
  const std::string& text_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& problem) const {
    throw Error(cat("kernel bundle manifest: ", problem, " at byte ", pos_));
  }

  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\n' || text_[pos_] == '\r' ||
                                   text_[pos_] == '\t'))
      ++pos_;
  }

  char peek() {
    skip_space();
    if (pos_ >= text_.size()) fail("unexpected end");
    return text_[pos_];
  }

  void expect(char c) {
    if (peek() != c) fail(cat("expected '", c, "'"));
    ++pos_;
  }

  bool literal(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (text_.compare(pos_, n, word) != 0) return false;
    pos_ += n;
    return true;
  }

  // The comma-separated elements of an object or array up to `close` (its opening bracket read).
  template <typename Element>
  void elements(char close, Element element) {
    if (peek() == close) {
      ++pos_;
      return;
    }
    while (true) {
      element();
      if (peek() != ',') break;
      ++pos_;
    }
    expect(close);
  }

  Json parse_value(int depth) {
    if (depth > kMaxDepth) fail("nesting too deep");
    Json value;
    char c = peek();
    if (c == '{') {
      ++pos_;
      value.kind_ = Json::Kind::Object;
      elements('}', [&] {
        if (peek() != '"') fail("expected a member name");
        std::string key = parse_string();
        expect(':');
        value.object_[key] = parse_value(depth + 1);
      });
      return value;
    }
    if (c == '[') {
      ++pos_;
      value.kind_ = Json::Kind::Array;
      elements(']', [&] { value.array_.push_back(parse_value(depth + 1)); });
      return value;
    }
    if (c == '"') {
      value.kind_ = Json::Kind::String;
      value.string_ = parse_string();
      return value;
    }
    if (literal("true") || literal("false")) {
      value.kind_ = Json::Kind::Bool;
      value.boolean_ = text_[pos_ - 1] == 'e' && text_[pos_ - 4] == 't';
      return value;
    }
    if (literal("null")) return value;
    return parse_number();
  }

  Json parse_number() {
    size_t start = pos_;
    if (text_[pos_] == '-') ++pos_;
    bool integral = true;
    while (pos_ < text_.size()) {
      char c = text_[pos_];
      if (c >= '0' && c <= '9') {
        ++pos_;
      } else if (c == '.' || c == 'e' || c == 'E' || c == '+' || (c == '-' && pos_ > start)) {
        integral = false;
        ++pos_;
      } else {
        break;
      }
    }
    std::string digits = text_.substr(start, pos_ - start);
    if (digits.empty() || digits == "-") fail("expected a value");
    Json value;
    value.kind_ = Json::Kind::Number;
    char* end = nullptr;
    value.number_ = std::strtod(digits.c_str(), &end);
    if (end != digits.c_str() + digits.size()) fail("malformed number");
    value.integral_ = integral;
    if (integral) value.integer_ = std::strtoll(digits.c_str(), nullptr, 10);
    return value;
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    while (true) {
      if (pos_ >= text_.size()) fail("unterminated string");
      char c = text_[pos_++];
      if (c == '"') return out;
      if (c != '\\') {
        out.push_back(c);
        continue;
      }
      if (pos_ >= text_.size()) fail("unterminated escape");
      char e = text_[pos_++];
      switch (e) {
        case '"': out.push_back('"'); break;
        case '\\': out.push_back('\\'); break;
        case '/': out.push_back('/'); break;
        case 'b': out.push_back('\b'); break;
        case 'f': out.push_back('\f'); break;
        case 'n': out.push_back('\n'); break;
        case 'r': out.push_back('\r'); break;
        case 't': out.push_back('\t'); break;
        case 'u': out += utf8(hex4()); break;
        default: fail("unknown escape");
      }
    }
  }

  unsigned hex4() {
    if (pos_ + 4 > text_.size()) fail("short \\u escape");
    unsigned code = 0;
    for (int i = 0; i < 4; ++i) {
      char c = text_[pos_++];
      code <<= 4;
      if (c >= '0' && c <= '9') code |= c - '0';
      else if (c >= 'a' && c <= 'f') code |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') code |= c - 'A' + 10;
      else fail("bad \\u escape");
    }
    return code;
  }

  // Manifests are ASCII (Python's json.dumps escapes the rest); surrogate pairs are not combined.
  static std::string utf8(unsigned code) {
    std::string out;
    if (code < 0x80) {
      out.push_back(static_cast<char>(code));
    } else if (code < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (code >> 6)));
      out.push_back(static_cast<char>(0x80 | (code & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xE0 | (code >> 12)));
      out.push_back(static_cast<char>(0x80 | ((code >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (code & 0x3F)));
    }
    return out;
  }
};

Json Json::parse(const std::string& text) { return JsonParser(text).document(); }

const Json& Json::null() {
  static const Json instance;
  return instance;
}

static const char* kind_name(Json::Kind kind) {
  switch (kind) {
    case Json::Kind::Null: return "null";
    case Json::Kind::Bool: return "a boolean";
    case Json::Kind::Number: return "a number";
    case Json::Kind::String: return "a string";
    case Json::Kind::Array: return "an array";
    case Json::Kind::Object: return "an object";
  }
  return "?";
}

static void require(bool ok, const char* what, const char* want, Json::Kind got) {
  if (!ok) throw Error(cat("kernel bundle manifest: ", what, " must be ", want, ", not ", kind_name(got)));
}

bool Json::as_bool(const char* what) const {
  require(kind_ == Kind::Bool, what, "a boolean", kind_);
  return boolean_;
}

int64_t Json::as_int(const char* what) const {
  require(kind_ == Kind::Number && integral_, what, "an integer", kind_);
  return integer_;
}

double Json::as_double(const char* what) const {
  require(kind_ == Kind::Number, what, "a number", kind_);
  return number_;
}

const std::string& Json::as_string(const char* what) const {
  require(kind_ == Kind::String, what, "a string", kind_);
  return string_;
}

const std::vector<Json>& Json::items(const char* what) const {
  require(kind_ == Kind::Array, what, "an array", kind_);
  return array_;
}

const std::map<std::string, Json>& Json::members() const {
  require(kind_ == Kind::Object, "value", "an object", kind_);
  return object_;
}

bool Json::has(const std::string& key) const { return kind_ == Kind::Object && object_.count(key) > 0; }

const Json& Json::operator[](const std::string& key) const {
  require(kind_ == Kind::Object, key.c_str(), "a member of an object", kind_);
  auto found = object_.find(key);
  if (found == object_.end()) throw Error(cat("kernel bundle manifest: member '", key, "' is missing"));
  return found->second;
}

const Json& Json::get(const std::string& key, const Json& fallback) const {
  if (kind_ != Kind::Object) return fallback;
  auto found = object_.find(key);
  return found == object_.end() ? fallback : found->second;
}

}  // namespace moexport
