// A small JSON reader for kernel-bundle manifests: objects, arrays, strings, numbers, true/false/null.
// Manifests are written by moexport itself (moexport/kernels/bundle.py), so the reader favours clear
// errors over speed; numbers are kept as int64 when integral and as double otherwise.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace moexport {

class Json {
 public:
  enum class Kind { Null, Bool, Number, String, Array, Object };

  static Json parse(const std::string& text);  // throws moexport::Error

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::Null; }
  bool is_string() const { return kind_ == Kind::String; }
  bool is_array() const { return kind_ == Kind::Array; }
  bool is_object() const { return kind_ == Kind::Object; }

  // Typed access; each throws moexport::Error naming `what` when the value has another kind.
  bool as_bool(const char* what = "value") const;
  int64_t as_int(const char* what = "value") const;
  double as_double(const char* what = "value") const;
  const std::string& as_string(const char* what = "value") const;
  const std::vector<Json>& items(const char* what = "value") const;

  bool has(const std::string& key) const;
  const Json& operator[](const std::string& key) const;  // throws when the key is missing
  const Json& get(const std::string& key, const Json& fallback) const;
  const std::map<std::string, Json>& members() const;

  static const Json& null();

 private:
  friend class JsonParser;
  Kind kind_ = Kind::Null;
  bool boolean_ = false;
  bool integral_ = false;
  int64_t integer_ = 0;
  double number_ = 0;
  std::string string_;
  std::vector<Json> array_;
  std::map<std::string, Json> object_;
};

}  // namespace moexport
