// 2D convolutions (forward, input gradient, weight gradient) through oneDNN, as XLA FFI custom calls for the
// CPU backend. Built and loaded by nfjax/models/onednn.py; the layouts are JAX's: activations NHWC, kernels HWIO
// with output channel block g reading input channel block g (feature_group_count's grouping), float32, row-major.
//
// Each call describes the caller's buffers to oneDNN as they are (activations as nhwc, the kernel through
// explicit strides into the HWIO buffer) and lets oneDNN choose its own kernel layout; the kernel is reordered
// into it on every call (kernels change every training step). Activations are read and written in place, except
// by the weight gradient on CPUs without AVX-512: there oneDNN also chooses the layout of its two activation
// inputs (blocked, nChw8c), reordered from NHWC on every call, because its AVX2 weight-gradient kernels run about
// 1.5x faster on blocked data. (Its other AVX2 kernels gain too, but reordering their outputs back to NHWC costs
// more than they gain.) NFJAX_ONEDNN_ACTIVATIONS=nhwc or =blocked overrides the choice. Primitives are created
// once per geometry and cached. Calls run one at a time: each already uses every core through oneDNN's OpenMP
// threads.
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum Kind : int64_t { kForward = 0, kInputGrad = 1, kWeightGrad = 2 };

struct Geometry {
  int64_t n, h, w, c;      // input
  int64_t kh, kw, o;       // kernel (HWIO: kh, kw, c / g, o)
  int64_t oh, ow;          // output spatial size
  int64_t sh, sw;          // strides
  int64_t pt, pb, pl, pr;  // padding: top, bottom, left, right
  int64_t g;               // groups
  std::vector<int64_t> Key(Kind kind) const {
    return {kind, n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, g};
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::desc Activations(int64_t n, int64_t c, int64_t h, int64_t w, bool any = false) {
  return memory::desc({n, c, h, w}, memory::data_type::f32, any ? memory::format_tag::any : memory::format_tag::nhwc);
}

// Whether oneDNN chooses the activations' layout (reordered from and to NHWC around each call) or reads NHWC.
bool BlockedActivations() {
  const char* forced = std::getenv("NFJAX_ONEDNN_ACTIVATIONS");
  if (forced != nullptr && std::string(forced) == "blocked") return true;
  if (forced != nullptr && std::string(forced) == "nhwc") return false;
  int isa = static_cast<int>(dnnl::get_effective_cpu_isa());
  return (isa & dnnl_cpu_isa_avx512_core) != dnnl_cpu_isa_avx512_core;
}

memory::dims KernelDims(const Geometry& q) {
  int64_t in_group = q.c / q.g, out_group = q.o / q.g;
  if (q.g == 1) return {q.o, in_group, q.kh, q.kw};
  return {q.g, out_group, in_group, q.kh, q.kw};
}

// The HWIO buffer in oneDNN's logical order ([G,] O/G, I/G, KH, KW), through strides.
memory::desc CallerKernel(const Geometry& q) {
  int64_t in_group = q.c / q.g, out_group = q.o / q.g;
  memory::dims strides{q.kw * in_group * q.o, in_group * q.o};  // kh, kw
  strides.insert(strides.begin(), {1, q.o});                    // o within the group, i
  if (q.g > 1) strides.insert(strides.begin(), out_group);      // the group
  return memory::desc(KernelDims(q), memory::data_type::f32, strides);
}

memory::desc AnyKernel(const Geometry& q) {
  return memory::desc(KernelDims(q), memory::data_type::f32, memory::format_tag::any);
}

dnnl::primitive_attr Attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& q, bool any) {
  auto src = Activations(q.n, q.c, q.h, q.w, any), dst = Activations(q.n, q.o, q.oh, q.ow, any);
#if DNNL_VERSION_MAJOR >= 3
  return dnnl::convolution_forward::primitive_desc(Engine(), dnnl::prop_kind::forward_training,
                                                   dnnl::algorithm::convolution_direct, src, AnyKernel(q), dst,
                                                   {q.sh, q.sw}, {q.pt, q.pl}, {q.pb, q.pr}, Attr());
#else
  dnnl::convolution_forward::desc desc(dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src,
                                       AnyKernel(q), dst, {q.sh, q.sw}, {q.pt, q.pl}, {q.pb, q.pr});
  return dnnl::convolution_forward::primitive_desc(desc, Attr(), Engine());
#endif
}

struct Prepared {
  dnnl::primitive primitive;
  memory::desc kernel;      // the layout the primitive reads or writes the kernel in
  memory::desc scratchpad;  // its working memory
  bool reorder = false;     // whether that layout differs from the caller's HWIO
  dnnl::reorder to_kernel;  // caller's kernel -> primitive's (forward, input gradient) or back (weight gradient)
  // The primitive's layouts of its two activation arguments: "first" is read from the caller's first buffer
  // (forward and weight gradient: x; input gradient: dy), "second" is written to the caller's output (forward:
  // y; input gradient: dx) or, for the weight gradient, read from its second buffer (dy). Each has a reorder
  // from (first; second of the weight gradient) or to (second otherwise) the caller's NHWC where they differ.
  memory::desc first, second;
  bool reorder_first = false, reorder_second = false;
  dnnl::reorder first_in, second_io;
};

std::mutex cache_mutex;
std::map<std::vector<int64_t>, std::shared_ptr<Prepared>> cache;

// The caller's NHWC layouts of the first and second activation arguments of ``kind`` (see Prepared).
memory::desc CallerFirst(const Geometry& q, Kind kind) {
  return kind == kInputGrad ? Activations(q.n, q.o, q.oh, q.ow) : Activations(q.n, q.c, q.h, q.w);
}
memory::desc CallerSecond(const Geometry& q, Kind kind) {
  return kind == kInputGrad ? Activations(q.n, q.c, q.h, q.w) : Activations(q.n, q.o, q.oh, q.ow);
}

std::shared_ptr<Prepared> Prepare(const Geometry& q, Kind kind, bool blocked) {
  auto key = q.Key(kind);
  key.push_back(blocked);
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto found = cache.find(key);
    if (found != cache.end()) return found->second;
  }
  auto prepared = std::make_shared<Prepared>();
  auto forward = ForwardPd(q, blocked);
  auto src = Activations(q.n, q.c, q.h, q.w, blocked), dst = Activations(q.n, q.o, q.oh, q.ow, blocked);
  if (kind == kForward) {
    prepared->primitive = dnnl::convolution_forward(forward);
    prepared->kernel = forward.weights_desc();
    prepared->scratchpad = forward.scratchpad_desc();
    prepared->first = forward.src_desc();
    prepared->second = forward.dst_desc();
  } else if (kind == kInputGrad) {
#if DNNL_VERSION_MAJOR >= 3
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), dnnl::algorithm::convolution_direct, src,
                                                       AnyKernel(q), dst, {q.sh, q.sw}, {q.pt, q.pl}, {q.pb, q.pr},
                                                       forward, Attr());
#else
    dnnl::convolution_backward_data::desc desc(dnnl::algorithm::convolution_direct, src, AnyKernel(q), dst,
                                               {q.sh, q.sw}, {q.pt, q.pl}, {q.pb, q.pr});
    dnnl::convolution_backward_data::primitive_desc pd(desc, Attr(), Engine(), forward);
#endif
    prepared->primitive = dnnl::convolution_backward_data(pd);
    prepared->kernel = pd.weights_desc();
    prepared->scratchpad = pd.scratchpad_desc();
    prepared->first = pd.diff_dst_desc();
    prepared->second = pd.diff_src_desc();
  } else {
#if DNNL_VERSION_MAJOR >= 3
    dnnl::convolution_backward_weights::primitive_desc pd(Engine(), dnnl::algorithm::convolution_direct, src,
                                                          AnyKernel(q), dst, {q.sh, q.sw}, {q.pt, q.pl},
                                                          {q.pb, q.pr}, forward, Attr());
#else
    dnnl::convolution_backward_weights::desc desc(dnnl::algorithm::convolution_direct, src, AnyKernel(q), dst,
                                                  {q.sh, q.sw}, {q.pt, q.pl}, {q.pb, q.pr});
    dnnl::convolution_backward_weights::primitive_desc pd(desc, Attr(), Engine(), forward);
#endif
    prepared->primitive = dnnl::convolution_backward_weights(pd);
    prepared->kernel = pd.diff_weights_desc();
    prepared->scratchpad = pd.scratchpad_desc();
    prepared->first = pd.src_desc();
    prepared->second = pd.diff_dst_desc();
  }
  auto caller = CallerKernel(q);
  if (prepared->kernel != caller) {
    prepared->reorder = true;
    prepared->to_kernel = kind == kWeightGrad
                              ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), prepared->kernel, Engine(), caller))
                              : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), caller, Engine(), prepared->kernel));
  }
  auto caller_first = CallerFirst(q, kind), caller_second = CallerSecond(q, kind);
  if (prepared->first != caller_first) {
    prepared->reorder_first = true;
    prepared->first_in = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), caller_first, Engine(), prepared->first));
  }
  if (prepared->second != caller_second) {
    prepared->reorder_second = true;
    prepared->second_io =
        kind == kWeightGrad
            ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), caller_second, Engine(), prepared->second))
            : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), prepared->second, Engine(), caller_second));
  }
  std::lock_guard<std::mutex> lock(cache_mutex);
  return cache.emplace(key, prepared).first->second;
}

struct Aligned {
  explicit Aligned(size_t bytes) : data(bytes ? std::aligned_alloc(64, (bytes + 63) / 64 * 64) : nullptr) {}
  ~Aligned() { std::free(data); }
  void* data;
};

std::mutex run_mutex;

// kForward: out = conv(a = x, b = kernel); kInputGrad: out = dx from (a = dy, b = kernel);
// kWeightGrad: out = d kernel from (a = x, b = dy).
ffi::Error Run(Kind kind, const Geometry& q, void* a, void* b, void* out) {
  try {
    auto prepared = Prepare(q, kind, kind == kWeightGrad && BlockedActivations());
    auto& engine = Engine();
    Aligned scratch(prepared->scratchpad.get_size());
    Aligned kernel_buffer(prepared->reorder ? prepared->kernel.get_size() : 0);
    Aligned first_buffer(prepared->reorder_first ? prepared->first.get_size() : 0);
    Aligned second_buffer(prepared->reorder_second ? prepared->second.get_size() : 0);
    memory scratchpad(prepared->scratchpad, engine, scratch.data);
    memory caller_kernel(CallerKernel(q), engine, kind == kWeightGrad ? out : b);
    memory kernel = prepared->reorder ? memory(prepared->kernel, engine, kernel_buffer.data) : caller_kernel;
    memory caller_first(CallerFirst(q, kind), engine, a);
    memory caller_second(CallerSecond(q, kind), engine, kind == kWeightGrad ? b : out);
    memory first = prepared->reorder_first ? memory(prepared->first, engine, first_buffer.data) : caller_first;
    memory second = prepared->reorder_second ? memory(prepared->second, engine, second_buffer.data) : caller_second;
    std::lock_guard<std::mutex> lock(run_mutex);
    dnnl::stream stream(engine);
    if (prepared->reorder_first) prepared->first_in.execute(stream, caller_first, first);
    if (kind == kForward) {
      if (prepared->reorder) prepared->to_kernel.execute(stream, caller_kernel, kernel);
      prepared->primitive.execute(stream, {{DNNL_ARG_SRC, first}, {DNNL_ARG_WEIGHTS, kernel}, {DNNL_ARG_DST, second},
                                           {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (prepared->reorder_second) prepared->second_io.execute(stream, second, caller_second);
    } else if (kind == kInputGrad) {
      if (prepared->reorder) prepared->to_kernel.execute(stream, caller_kernel, kernel);
      prepared->primitive.execute(stream, {{DNNL_ARG_DIFF_DST, first}, {DNNL_ARG_WEIGHTS, kernel},
                                           {DNNL_ARG_DIFF_SRC, second}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (prepared->reorder_second) prepared->second_io.execute(stream, second, caller_second);
    } else {
      if (prepared->reorder_second) prepared->second_io.execute(stream, caller_second, second);
      prepared->primitive.execute(stream, {{DNNL_ARG_SRC, first}, {DNNL_ARG_DIFF_DST, second},
                                           {DNNL_ARG_DIFF_WEIGHTS, kernel}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (prepared->reorder) prepared->to_kernel.execute(stream, kernel, caller_kernel);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution failed: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Check(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k, ffi::Span<const int64_t> y, int64_t g) {
  if (x.size() != 4 || k.size() != 4 || y.size() != 4)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "oneDNN convolution: rank-4 NHWC / HWIO buffers expected");
  if (g < 1 || x[3] != k[2] * g || k[3] % g != 0 || y[3] != k[3] || x[0] != y[0])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "oneDNN convolution: shapes and groups do not agree");
  return ffi::Error::Success();
}

Geometry Describe(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k, ffi::Span<const int64_t> y, int64_t sh,
                  int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t g) {
  return Geometry{x[0], x[1], x[2], x[3], k[0], k[1], k[3], y[1], y[2], sh, sw, pt, pb, pl, pr, g};
}

using F32 = ffi::Buffer<ffi::F32>;

ffi::Error Forward(F32 x, F32 k, ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                   int64_t pl, int64_t pr, int64_t g) {
  if (auto e = Check(x.dimensions(), k.dimensions(), y->dimensions(), g); e.failure()) return e;
  return Run(kForward, Describe(x.dimensions(), k.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr, g),
             x.untyped_data(), k.untyped_data(), y->untyped_data());
}

// Both gradients in one call, one after the other: as two calls, XLA would run them at once, and one would wait
// (holding an XLA worker thread) for the other's cores.
ffi::Error Backward(F32 x, F32 k, F32 dy, ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dk, int64_t sh,
                    int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t g) {
  if (auto e = Check(x.dimensions(), k.dimensions(), dy.dimensions(), g); e.failure()) return e;
  auto q = Describe(x.dimensions(), k.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr, g);
  if (auto e = Run(kInputGrad, q, dy.untyped_data(), k.untyped_data(), dx->untyped_data()); e.failure()) return e;
  return Run(kWeightGrad, q, x.untyped_data(), dy.untyped_data(), dk->untyped_data());
}

}  // namespace

#define NFJAX_CONV_ATTRS                                                                                \
  .Attr<int64_t>("sh")                                                                                  \
      .Attr<int64_t>("sw")                                                                              \
      .Attr<int64_t>("pt")                                                                              \
      .Attr<int64_t>("pb")                                                                              \
      .Attr<int64_t>("pl")                                                                              \
      .Attr<int64_t>("pr")                                                                              \
      .Attr<int64_t>("g")

XLA_FFI_DEFINE_HANDLER_SYMBOL(NfjaxOnednnConvForward, Forward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() NFJAX_CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(NfjaxOnednnConvBackward, Backward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>()
                                  NFJAX_CONV_ATTRS);

extern "C" int NfjaxOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return static_cast<int>(v->major * 10000 + v->minor * 100 + v->patch);
}
