/* libmoexport_rtx_alias.so has no code: it is a soname (libtensorrt_rtx.so) and a dependency
   (libtensorrt_rtx.so.1), which is all TensorRT-RTX needs to find itself by the name it opens itself
   with (moexport/trt_plugins/library.py). */
typedef int moexport_rtx_alias_is_empty;
