// CPU emulation of the CUDA subset fusec's flash_attn kernels use (tests/cuda_emu.py): each block runs as
// blockDim OS threads; warp shuffles / votes / __syncwarp are barriers over the warp's 32 threads,
// __syncthreads a barrier over the block, __shared__ is a function-static (shared by the block's threads;
// blocks run one after another). half is _Float16. Not a CUDA implementation: enough to execute the
// generated sources on a machine without a GPU and check their index arithmetic and results.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct uint3 { unsigned x, y, z; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct half {
    _Float16 v;
    half() = default;
    half(float f) : v((_Float16)f) {}
    operator float() const { return (float)v; }
};
struct half2 { half x, y; };
inline float2 __half22float2(half2 h) { return {float(h.x), float(h.y)}; }
inline half2 __floats2half2_rn(float a, float b) { return {half(a), half(b)}; }
inline float __half2float(half h) { return float(h); }
inline half __float2half_rn(float f) { return half(f); }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
// a buffer argument: converts to the kernel's parameter pointer type (half*, float4*, vector structs)
struct EmuPtr {
    void* p;
    template <typename T> operator T*() const { return static_cast<T*>(p); }
};

struct EmuWarp {
    std::barrier<> bar{32};
    alignas(16) unsigned char buf[32][16];
};
inline thread_local uint3 threadIdx, blockIdx;
inline uint3 gridDim, blockDim;
inline thread_local EmuWarp* emu_warp;
inline thread_local unsigned emu_lane;
inline thread_local std::barrier<>* emu_block;

inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp->bar.arrive_and_wait(); }
inline void __syncthreads() { emu_block->arrive_and_wait(); }
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int o, int = 32) {
    static_assert(sizeof(T) <= 16, "shuffle of a large type");
    std::memcpy(emu_warp->buf[emu_lane], &v, sizeof(T));
    emu_warp->bar.arrive_and_wait();
    T r;
    std::memcpy(&r, emu_warp->buf[emu_lane ^ (unsigned)o], sizeof(T));
    emu_warp->bar.arrive_and_wait();
    return r;
}
inline int __all_sync(unsigned, int pred) {
    const int p = pred != 0;
    std::memcpy(emu_warp->buf[emu_lane], &p, sizeof(int));
    emu_warp->bar.arrive_and_wait();
    int all = 1;
    for (int i = 0; i < 32; i++) {
        int x;
        std::memcpy(&x, emu_warp->buf[i], sizeof(int));
        all &= x;
    }
    emu_warp->bar.arrive_and_wait();
    return all;
}

// run every block of the grid, one after another (blockDim.x a multiple of 32, y = z = 1)
template <typename F, typename... A> void emu_launch(F f, uint3 grid, uint3 block, A... args) {
    gridDim = grid;
    blockDim = block;
    const unsigned nt = block.x;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                std::barrier<> bb(nt);
                std::vector<std::unique_ptr<EmuWarp>> warps;
                for (unsigned w = 0; w < nt / 32; w++) warps.emplace_back(new EmuWarp());
                std::vector<std::thread> th;
                for (unsigned t = 0; t < nt; t++)
                    th.emplace_back([&, t] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        emu_warp = warps[t / 32].get();
                        emu_lane = t % 32;
                        emu_block = &bb;
                        f(args...);
                        emu_warp->bar.arrive_and_drop();
                        emu_block->arrive_and_drop();
                    });
                for (auto& t : th) t.join();
            }
}

inline unsigned __ballot_sync(unsigned, int pred) {
    const int p = pred != 0;
    std::memcpy(emu_warp->buf[emu_lane], &p, sizeof(int));
    emu_warp->bar.arrive_and_wait();
    unsigned bal = 0;
    for (int i = 0; i < 32; i++) {
        int x;
        std::memcpy(&x, emu_warp->buf[i], sizeof(int));
        if (x) bal |= 1u << i;
    }
    emu_warp->bar.arrive_and_wait();
    return bal;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
