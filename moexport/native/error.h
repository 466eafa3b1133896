// The one exception type of the native code: a message meant for the user, which each host (the ONNX
// Runtime op library, the TensorRT plugins) turns into its own error status.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace moexport {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// Error(cat("bundle ", key, " has no plan for ", n, " tokens")): a message from pieces of any type.
template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

}  // namespace moexport
