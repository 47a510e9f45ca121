// fusec MSL syntax shim: lets `g++ -std=c++17 -fsyntax-only -Wno-attributes` parse Metal Shading
// Language compute kernels. It models the Metal stdlib surface used by compute kernels (address
// spaces, scalar/vector types, math, simdgroup and threadgroup functions) with plain C++ so that
// syntax, name lookup, overload resolution and type errors are caught. It does NOT model Metal
// semantics: address-space rules, attribute validity, half precision arithmetic, simdgroup
// behaviour. `[[buffer(i)]]`-style attributes are ignored by g++ (-Wno-attributes).
// `#include <metal_stdlib>` is satisfied by an empty header the checker places on the include path.
#pragma once

#define kernel
#define device
#define constant
#define threadgroup
#define thread
#define METAL_FUNC inline

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;

namespace metal {

struct half {
    float f_;
    half() = default;
    constexpr half(float v) : f_(v) {}
    constexpr half(double v) : f_(float(v)) {}
    constexpr half(int v) : f_(float(v)) {}
    constexpr half(uint v) : f_(float(v)) {}
    constexpr operator float() const { return f_; }
    half &operator+=(float v) { f_ += v; return *this; }
    half &operator-=(float v) { f_ -= v; return *this; }
    half &operator*=(float v) { f_ *= v; return *this; }
    half &operator/=(float v) { f_ /= v; return *this; }
};

template <typename T, int N> struct vec;

#define FUSEC_VEC_COMMON(N)                                                                      \
    vec() = default;                                                                             \
    explicit vec(T s) { for (int i = 0; i < N; ++i) (*this)[i] = s; }                           \
    template <typename U> explicit vec(const vec<U, N> &o) {                                     \
        for (int i = 0; i < N; ++i) (*this)[i] = T(o[i]);                                        \
    }                                                                                            \
    T &operator[](int i) { return (&x)[i]; }                                                     \
    const T &operator[](int i) const { return (&x)[i]; }

template <typename T> struct vec<T, 2> {
    T x, y;
    FUSEC_VEC_COMMON(2)
    vec(T a, T b) : x(a), y(b) {}
};
template <typename T> struct vec<T, 3> {
    T x, y, z;
    FUSEC_VEC_COMMON(3)
    vec(T a, T b, T c) : x(a), y(b), z(c) {}
    vec(vec<T, 2> a, T c) : x(a.x), y(a.y), z(c) {}
};
template <typename T> struct vec<T, 4> {
    T x, y, z, w;
    FUSEC_VEC_COMMON(4)
    vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
    vec(vec<T, 2> a, vec<T, 2> b) : x(a.x), y(a.y), z(b.x), w(b.y) {}
    vec(vec<T, 3> a, T d) : x(a.x), y(a.y), z(a.z), w(d) {}
};
#undef FUSEC_VEC_COMMON

#define FUSEC_VEC_BINOP(op)                                                                      \
    template <typename T, int N> vec<T, N> operator op(vec<T, N> a, const vec<T, N> &b) {        \
        for (int i = 0; i < N; ++i) a[i] = a[i] op b[i];                                         \
        return a;                                                                                \
    }                                                                                            \
    template <typename T, int N, typename S> vec<T, N> operator op(vec<T, N> a, S b) {           \
        for (int i = 0; i < N; ++i) a[i] = a[i] op T(b);                                         \
        return a;                                                                                \
    }                                                                                            \
    template <typename T, int N, typename S> vec<T, N> operator op(S a, vec<T, N> b) {           \
        for (int i = 0; i < N; ++i) b[i] = T(a) op b[i];                                         \
        return b;                                                                                \
    }                                                                                            \
    template <typename T, int N, typename S> vec<T, N> &operator op##=(vec<T, N> &a, const S &b) { \
        a = a op b;                                                                              \
        return a;                                                                                \
    }
FUSEC_VEC_BINOP(+)
FUSEC_VEC_BINOP(-)
FUSEC_VEC_BINOP(*)
FUSEC_VEC_BINOP(/)
#undef FUSEC_VEC_BINOP
template <typename T, int N> vec<T, N> operator-(vec<T, N> a) {
    for (int i = 0; i < N; ++i) a[i] = -a[i];
    return a;
}
#define FUSEC_VEC_CMP(op)                                                                        \
    template <typename T, int N> vec<bool, N> operator op(const vec<T, N> &a, const vec<T, N> &b) { \
        vec<bool, N> r;                                                                          \
        for (int i = 0; i < N; ++i) r[i] = a[i] op b[i];                                         \
        return r;                                                                                \
    }
FUSEC_VEC_CMP(<)
FUSEC_VEC_CMP(>)
FUSEC_VEC_CMP(<=)
FUSEC_VEC_CMP(>=)
FUSEC_VEC_CMP(==)
FUSEC_VEC_CMP(!=)
#undef FUSEC_VEC_CMP

#define FUSEC_VEC_TYPES(T, name)                                                                 \
    typedef vec<T, 2> name##2;                                                                   \
    typedef vec<T, 3> name##3;                                                                   \
    typedef vec<T, 4> name##4;                                                                   \
    typedef vec<T, 4> packed_##name##4;
FUSEC_VEC_TYPES(float, float)
FUSEC_VEC_TYPES(half, half)
FUSEC_VEC_TYPES(int, int)
FUSEC_VEC_TYPES(uint, uint)
FUSEC_VEC_TYPES(short, short)
FUSEC_VEC_TYPES(ushort, ushort)
FUSEC_VEC_TYPES(char, char)
FUSEC_VEC_TYPES(uchar, uchar)
FUSEC_VEC_TYPES(bool, bool)
#undef FUSEC_VEC_TYPES

// -- element-wise math: scalar float/half overloads plus component-wise vector versions ----------
#define FUSEC_UNARY(name, builtin)                                                               \
    inline float name(float v) { return builtin(v); }                                            \
    inline half name(half v) { return half(builtin(float(v))); }                                 \
    template <typename T, int N> vec<T, N> name(vec<T, N> v) {                                   \
        for (int i = 0; i < N; ++i) v[i] = name(v[i]);                                           \
        return v;                                                                                \
    }
FUSEC_UNARY(sqrt, __builtin_sqrtf)
FUSEC_UNARY(exp, __builtin_expf)
FUSEC_UNARY(exp2, __builtin_exp2f)
FUSEC_UNARY(log, __builtin_logf)
FUSEC_UNARY(log2, __builtin_log2f)
FUSEC_UNARY(sin, __builtin_sinf)
FUSEC_UNARY(cos, __builtin_cosf)
FUSEC_UNARY(tan, __builtin_tanf)
FUSEC_UNARY(tanh, __builtin_tanhf)
FUSEC_UNARY(fabs, __builtin_fabsf)
FUSEC_UNARY(abs, __builtin_fabsf)
FUSEC_UNARY(floor, __builtin_floorf)
FUSEC_UNARY(ceil, __builtin_ceilf)
FUSEC_UNARY(round, __builtin_roundf)
FUSEC_UNARY(trunc, __builtin_truncf)
#undef FUSEC_UNARY
inline float rsqrt(float v) { return 1.0f / __builtin_sqrtf(v); }
inline half rsqrt(half v) { return half(1.0f / __builtin_sqrtf(float(v))); }
template <typename T, int N> vec<T, N> rsqrt(vec<T, N> v) {
    for (int i = 0; i < N; ++i) v[i] = rsqrt(v[i]);
    return v;
}
inline float fract(float v) { return v - __builtin_floorf(v); }
inline half fract(half v) { return half(fract(float(v))); }
inline int abs(int v) { return v < 0 ? -v : v; }

#define FUSEC_BINARY(name, expr)                                                                 \
    template <typename T> T name(T a, T b) { return expr; }                                      \
    template <typename T, int N> vec<T, N> name(vec<T, N> a, vec<T, N> b) {                      \
        for (int i = 0; i < N; ++i) a[i] = name(a[i], b[i]);                                     \
        return a;                                                                                \
    }                                                                                            \
    template <typename T, int N> vec<T, N> name(vec<T, N> a, T b) {                              \
        for (int i = 0; i < N; ++i) a[i] = name(a[i], b);                                        \
        return a;                                                                                \
    }
FUSEC_BINARY(max, a > b ? a : b)
FUSEC_BINARY(min, a < b ? a : b)
FUSEC_BINARY(fmax, a > b ? a : b)
FUSEC_BINARY(fmin, a < b ? a : b)
FUSEC_BINARY(pow, T(__builtin_powf(float(a), float(b))))
FUSEC_BINARY(powr, T(__builtin_powf(float(a), float(b))))
FUSEC_BINARY(fmod, T(__builtin_fmodf(float(a), float(b))))
FUSEC_BINARY(atan2, T(__builtin_atan2f(float(a), float(b))))
FUSEC_BINARY(copysign, T(__builtin_copysignf(float(a), float(b))))
FUSEC_BINARY(step, T(float(b) < float(a) ? 0.0f : 1.0f))
#undef FUSEC_BINARY

template <typename T> T clamp(T x, T lo, T hi) { return x < lo ? lo : (x > hi ? hi : x); }
template <typename T, int N> vec<T, N> clamp(vec<T, N> x, T lo, T hi) {
    for (int i = 0; i < N; ++i) x[i] = clamp(x[i], lo, hi);
    return x;
}
template <typename T> T fma(T a, T b, T c) { return a * b + c; }
template <typename T> T mix(T a, T b, T t) { return a + (b - a) * t; }
template <typename T> T select(T a, T b, bool c) { return c ? b : a; }
template <typename T, int N> vec<T, N> select(vec<T, N> a, vec<T, N> b, vec<bool, N> c) {
    for (int i = 0; i < N; ++i) a[i] = c[i] ? b[i] : a[i];
    return a;
}
template <typename T> T saturate(T x) { return clamp(x, T(0), T(1)); }
template <typename T, int N> T dot(const vec<T, N> &a, const vec<T, N> &b) {
    T s = T(0);
    for (int i = 0; i < N; ++i) s = s + a[i] * b[i];
    return s;
}
template <typename T, int N> T length(const vec<T, N> &a) { return sqrt(dot(a, a)); }
template <int N> bool all(const vec<bool, N> &v) {
    for (int i = 0; i < N; ++i) if (!v[i]) return false;
    return true;
}
template <int N> bool any(const vec<bool, N> &v) {
    for (int i = 0; i < N; ++i) if (v[i]) return true;
    return false;
}
template <typename T> bool isnan(T v) { return __builtin_isnan(float(v)); }
template <typename T> bool isinf(T v) { return __builtin_isinf(float(v)); }
template <typename T> bool isfinite(T v) { return __builtin_isfinite(float(v)); }
template <typename To, typename From> To as_type(From v) {
    static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
    To r;
    __builtin_memcpy(&r, &v, sizeof(To));
    return r;
}

namespace precise {
using metal::cos; using metal::exp; using metal::log; using metal::rsqrt; using metal::sin; using metal::sqrt;
using metal::tanh; using metal::pow;
}  // namespace precise
namespace fast {
using metal::cos; using metal::exp; using metal::log; using metal::rsqrt; using metal::sin; using metal::sqrt;
using metal::tanh; using metal::pow;
}  // namespace fast

// -- synchronisation and simdgroup functions ------------------------------------------------------
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
inline void threadgroup_barrier(mem_flags) {}
inline void simdgroup_barrier(mem_flags) {}

template <typename T> T simd_sum(T v) { return v; }
template <typename T> T simd_prefix_exclusive_sum(T v) { return v; }
template <typename T> T simd_max(T v) { return v; }
template <typename T> T simd_min(T v) { return v; }
template <typename T> T simd_shuffle(T v, ushort) { return v; }
template <typename T> T simd_shuffle_xor(T v, ushort) { return v; }
template <typename T> T simd_shuffle_down(T v, ushort) { return v; }
template <typename T> T simd_shuffle_up(T v, ushort) { return v; }
template <typename T> T simd_broadcast(T v, ushort) { return v; }
template <typename T> T simd_broadcast_first(T v) { return v; }
inline bool simd_all(bool v) { return v; }
inline bool simd_any(bool v) { return v; }

// -- atomics (the relaxed subset compute kernels use) ------------------------------------------------
enum memory_order { memory_order_relaxed };
template <typename T> struct atomic { T v_; };
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
template <typename T, typename U> T atomic_fetch_add_explicit(atomic<T> *a, U v, memory_order) {
    T o = a->v_; a->v_ = o + T(v); return o;
}
template <typename T, typename U> T atomic_fetch_max_explicit(atomic<T> *a, U v, memory_order) {
    T o = a->v_; a->v_ = o > T(v) ? o : T(v); return o;
}
template <typename T> T atomic_load_explicit(atomic<T> *a, memory_order) { return a->v_; }
template <typename T, typename U> void atomic_store_explicit(atomic<T> *a, U v, memory_order) { a->v_ = T(v); }

}  // namespace metal

using metal::half;
using metal::float2; using metal::float3; using metal::float4; using metal::packed_float4;
using metal::half2; using metal::half3; using metal::half4; using metal::packed_half4;
using metal::int2; using metal::int3; using metal::int4;
using metal::uint2; using metal::uint3; using metal::uint4;
using metal::short2; using metal::short4; using metal::ushort2; using metal::ushort3; using metal::ushort4;
using metal::char4; using metal::uchar4; using metal::bool2; using metal::bool3; using metal::bool4;

#define INFINITY (__builtin_inff())
#define NAN (__builtin_nanf(""))
#define FLT_MAX 3.402823466e+38f
#define FLT_MIN 1.175494351e-38f
#define HALF_MAX 65504.0f
#define M_PI_F 3.14159265358979323846f
#define M_SQRT2_F 1.41421356237309504880f
#define M_LN2_F 0.69314718055994530942f
