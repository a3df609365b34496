// The runtime of the emulated CUDA execution model (fcn_fast/cuda_emulation.h, docs/emulator.md): the block
// scheduler, the fibers its threads run on, the knobs and counters. Compiled into fcn_fast._C_emu only.
#include "fcn_fast/cuda_emulation.h"

#include "fcn_fast/common.h"

#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <torch/library.h>
#include <unistd.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define FCN_FAST_ASAN_FIBERS 1
#endif

namespace fcn_fast {
namespace emu {

thread_local const ThreadContext* current_thread = nullptr;

namespace {

// ---- knobs and counters ------------------------------------------------------------------------------------------

enum class Schedule : int { kForward = 0, kReverse = 1 };

Schedule parse_schedule(const std::string& name) {
  if (name == "forward") return Schedule::kForward;
  if (name == "reverse") return Schedule::kReverse;
  TORCH_CHECK(false, "emulator schedule must be \"forward\" or \"reverse\", got \"", name, "\"");
}

const char* schedule_name(Schedule s) { return s == Schedule::kForward ? "forward" : "reverse"; }

int64_t env_int(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  const long long parsed = std::strtoll(value, &end, 10);
  TORCH_CHECK(end != value && *end == '\0', name, " must be an integer, got \"", value, "\"");
  return parsed;
}

struct Options {
  std::atomic<int> schedule{static_cast<int>(
      parse_schedule(std::getenv("FCN_FAST_EMU_SCHEDULE") ? std::getenv("FCN_FAST_EMU_SCHEDULE") : "forward"))};
  // 0: no cap of the emulator's own (the launch policy's kMaxBlocks applies).
  std::atomic<int64_t> max_blocks{env_int("FCN_FAST_EMU_MAX_BLOCKS", 0)};
  std::atomic<bool> int64_indices{env_int("FCN_FAST_EMU_INT64", 0) != 0};
};

Options& options() {
  static Options o;
  return o;
}

struct Counters {
  std::atomic<int64_t> launches{0}, blocks{0}, threads{0}, barriers{0}, int32_choices{0}, int64_choices{0};
};

Counters& counters() {
  static Counters c;
  return c;
}

// ---- fibers ------------------------------------------------------------------------------------------------------

#ifdef FCN_FAST_ASAN_FIBERS
constexpr size_t kStackBytes = size_t(1) << 20;  // AddressSanitizer's redzones make frames several times larger
#else
constexpr size_t kStackBytes = size_t(256) << 10;
#endif

// An mmap'ed stack with an inaccessible guard page below it, so an overflow faults instead of corrupting memory.
class FiberStack {
 public:
  FiberStack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    mapping_bytes_ = kStackBytes + page;
    void* p = mmap(nullptr, mapping_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "emulator: cannot map a fiber stack: ", std::strerror(errno));
    mapping_ = static_cast<char*>(p);
    TORCH_CHECK(mprotect(mapping_, page, PROT_NONE) == 0, "emulator: mprotect failed: ", std::strerror(errno));
    bottom_ = mapping_ + page;
  }
  ~FiberStack() { munmap(mapping_, mapping_bytes_); }
  FiberStack(const FiberStack&) = delete;
  FiberStack& operator=(const FiberStack&) = delete;
  char* bottom() const { return bottom_; }
  char* top() const { return bottom_ + kStackBytes; }

 private:
  char* mapping_ = nullptr;
  char* bottom_ = nullptr;
  size_t mapping_bytes_ = 0;
};

#if defined(__x86_64__)
// A context is the stack pointer of a suspended fiber: the switch pushes the callee-saved registers and the SSE/x87
// control words, saves rsp, loads the other one and pops. glibc's swapcontext also saves the signal mask, a system
// call per switch that made it ten times slower: a test suite switches millions of times.
struct Context {
  void* sp = nullptr;
};

extern "C" void fcn_fast_emu_switch(void** save_sp, void* load_sp);
extern "C" void fcn_fast_emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl fcn_fast_emu_switch
  .hidden fcn_fast_emu_switch
  .type fcn_fast_emu_switch, @function
fcn_fast_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fcn_fast_emu_switch, .-fcn_fast_emu_switch

  .p2align 4
  .globl fcn_fast_emu_trampoline
  .hidden fcn_fast_emu_trampoline
  .type fcn_fast_emu_trampoline, @function
fcn_fast_emu_trampoline:
  callq *%r13
  ud2
  .size fcn_fast_emu_trampoline, .-fcn_fast_emu_trampoline
)");

// A fresh context on `stack` whose first switch-in calls entry() (which must never return), with the calling
// thread's floating-point control words.
void make_context(Context& c, const FiberStack& stack, void (*entry)()) {
  uintptr_t top = reinterpret_cast<uintptr_t>(stack.top()) & ~uintptr_t(15);
  // The frame fcn_fast_emu_switch pops, lowest address first: control words, r15, r14, r13 (entry), r12, rbx, rbp,
  // return address. After its ret, rsp = top - 16: 16-byte aligned at the trampoline's call, as the ABI wants.
  auto* frame = reinterpret_cast<uint64_t*>(top - 16 - 8 * 8);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  frame[0] = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  frame[1] = frame[2] = 0;                                   // r15, r14
  frame[3] = reinterpret_cast<uint64_t>(entry);              // r13
  frame[4] = frame[5] = frame[6] = 0;                        // r12, rbx, rbp
  frame[7] = reinterpret_cast<uint64_t>(&fcn_fast_emu_trampoline);
  c.sp = frame;
}

void switch_context(Context& from, Context& to) { fcn_fast_emu_switch(&from.sp, to.sp); }
#else
// Elsewhere glibc's ucontext (slower: a system call per switch).
struct Context {
  ucontext_t uc;
};

void make_context(Context& c, const FiberStack& stack, void (*entry)()) {
  TORCH_CHECK(getcontext(&c.uc) == 0, "emulator: getcontext failed");
  c.uc.uc_stack.ss_sp = stack.bottom();
  c.uc.uc_stack.ss_size = kStackBytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

void switch_context(Context& from, Context& to) {
  TORCH_CHECK(swapcontext(&from.uc, &to.uc) == 0, "emulator: swapcontext failed");
}
#endif

enum class State { kReady, kAtBarrier, kDone };

struct Fiber {
  FiberStack stack;
  Context context;
  ThreadContext builtins;
  State state = State::kReady;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
#ifdef FCN_FAST_ASAN_FIBERS
  void* fake_stack = nullptr;
#endif
};

// One per OS thread that launches emulated kernels: the fibers (reused across blocks and launches) and the
// scheduler's own context.
struct Scheduler {
  std::vector<std::unique_ptr<Fiber>> fibers;
  Context context;
  const std::function<void()>* body = nullptr;
  Fiber* running = nullptr;
  std::exception_ptr error;
  bool active = false;
#ifdef FCN_FAST_ASAN_FIBERS
  const void* stack_bottom = nullptr;
  size_t stack_size = 0;
#endif

  void ensure_fibers(size_t count) {
    while (fibers.size() < count) fibers.push_back(std::make_unique<Fiber>());
  }

  // Control passes from the scheduler into `fiber` until it reaches a barrier or returns.
  void resume(Fiber* fiber) {
    running = fiber;
    current_thread = &fiber->builtins;
#ifdef FCN_FAST_ASAN_FIBERS
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, fiber->stack.bottom(), kStackBytes);
#endif
    switch_context(context, fiber->context);
#ifdef FCN_FAST_ASAN_FIBERS
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    running = nullptr;
    current_thread = nullptr;
  }

  // From inside the running fiber back to the scheduler; returns when the scheduler resumes the fiber.
  void suspend(Fiber* fiber) {
#ifdef FCN_FAST_ASAN_FIBERS
    // A fiber that is done never comes back: nullptr lets AddressSanitizer free its fake stack.
    __sanitizer_start_switch_fiber(fiber->state == State::kDone ? nullptr : &fiber->fake_stack, stack_bottom,
                                   stack_size);
#endif
    switch_context(fiber->context, context);
#ifdef FCN_FAST_ASAN_FIBERS
    __sanitizer_finish_switch_fiber(fiber->fake_stack, nullptr, nullptr);
#endif
  }

  static void entry();
};

thread_local Scheduler scheduler;

void Scheduler::entry() {
  Scheduler& s = scheduler;
  Fiber* fiber = s.running;
#ifdef FCN_FAST_ASAN_FIBERS
  __sanitizer_finish_switch_fiber(nullptr, &s.stack_bottom, &s.stack_size);
#endif
  try {
    (*s.body)();
  } catch (...) {
    // Kernels do not throw; should one, it must not unwind through the fiber boundary.
    if (!s.error) s.error = std::current_exception();
  }
  fiber->state = State::kDone;
  s.suspend(fiber);  // never resumed: the next block makes the context anew
  std::abort();
}

std::string site(const Fiber& f) { return std::string(f.barrier_file) + ":" + std::to_string(f.barrier_line); }

// Runs one block: phases separated by barriers, each phase running every live thread in schedule order until it
// arrives at the barrier or returns.
void run_block(Scheduler& s, const dim3& grid, const dim3& block, const uint3& block_idx, Schedule schedule) {
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  std::vector<Fiber*> live;
  live.reserve(threads);
  for (size_t t = 0; t < threads; ++t) {
    Fiber* f = s.fibers[t].get();
    f->builtins.thread_idx = uint3{static_cast<unsigned>(t % block.x), static_cast<unsigned>((t / block.x) % block.y),
                                   static_cast<unsigned>(t / (static_cast<size_t>(block.x) * block.y))};
    f->builtins.block_idx = block_idx;
    f->builtins.block_dim = block;
    f->builtins.grid_dim = grid;
    f->state = State::kReady;
    make_context(f->context, f->stack, &Scheduler::entry);
    live.push_back(f);
  }
  if (schedule == Schedule::kReverse) std::reverse(live.begin(), live.end());
  while (!live.empty()) {
    for (Fiber* f : live) {
      s.resume(f);
      if (s.error) std::rethrow_exception(s.error);
    }
    const auto at_barrier = std::stable_partition(live.begin(), live.end(),
                                                  [](const Fiber* f) { return f->state == State::kAtBarrier; });
    const size_t waiting = static_cast<size_t>(at_barrier - live.begin());
    if (waiting == 0) break;
    const Fiber* first = live.front();
    TORCH_CHECK(waiting == live.size(), "emulated CUDA: divergent __syncthreads in block (", block_idx.x, ", ",
                block_idx.y, ", ", block_idx.z, "): ", waiting, " threads wait at ", site(*first), " while ",
                live.size() - waiting, " returned (undefined behaviour on a GPU)");
    for (const Fiber* f : live) {
      TORCH_CHECK(f->barrier_line == first->barrier_line && std::strcmp(f->barrier_file, first->barrier_file) == 0,
                  "emulated CUDA: threads of block (", block_idx.x, ", ", block_idx.y, ", ", block_idx.z,
                  ") wait at different barriers: thread ", f->builtins.thread_idx.x, " at ", site(*f), ", thread ",
                  first->builtins.thread_idx.x, " at ", site(*first));
    }
    counters().barriers.fetch_add(1, std::memory_order_relaxed);
    live.erase(at_barrier, live.end());
    for (Fiber* f : live) f->state = State::kReady;
  }
}

}  // namespace

void run_grid(dim3 grid, dim3 block, const std::function<void()>& thread_body) {
  // The CUDA runtime's limits (compute capability 9.0): a launch outside them fails with "invalid configuration".
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && block.x >= 1 && block.y >= 1 && block.z >= 1,
              "emulated CUDA: invalid configuration: a grid of (", grid.x, ", ", grid.y, ", ", grid.z,
              ") blocks of (", block.x, ", ", block.y, ", ", block.z, ") threads has an empty dimension");
  TORCH_CHECK(grid.x <= 2147483647u && grid.y <= 65535u && grid.z <= 65535u,
              "emulated CUDA: invalid configuration: grid (", grid.x, ", ", grid.y, ", ", grid.z, ") is too large");
  TORCH_CHECK(threads <= 1024 && block.z <= 64, "emulated CUDA: invalid configuration: block (", block.x, ", ",
              block.y, ", ", block.z, ") has more than 1024 threads or z > 64");
  Scheduler& s = scheduler;
  TORCH_CHECK(!s.active, "emulated CUDA: a kernel launched another kernel (dynamic parallelism is not emulated)");
  s.ensure_fibers(static_cast<size_t>(threads));
  s.body = &thread_body;
  s.error = nullptr;
  s.active = true;
  const Schedule schedule = static_cast<Schedule>(options().schedule.load());
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  try {
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t b = schedule == Schedule::kReverse ? blocks - 1 - k : k;
      const uint3 block_idx{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                            static_cast<unsigned>(b / (int64_t(grid.x) * grid.y))};
      run_block(s, grid, block, block_idx, schedule);
    }
  } catch (...) {
    s.active = false;
    s.body = nullptr;
    throw;
  }
  s.active = false;
  s.body = nullptr;
  Counters& c = counters();
  c.launches.fetch_add(1, std::memory_order_relaxed);
  c.blocks.fetch_add(blocks, std::memory_order_relaxed);
  c.threads.fetch_add(blocks * threads, std::memory_order_relaxed);
}

void syncthreads(const char* file, int line) {
  Scheduler& s = scheduler;
  Fiber* fiber = s.running;
  TORCH_CHECK(fiber != nullptr, "__syncthreads() outside an emulated kernel launch");
  fiber->state = State::kAtBarrier;
  fiber->barrier_file = file;
  fiber->barrier_line = line;
  s.suspend(fiber);
}

int64_t max_blocks() {
  const int64_t cap = options().max_blocks.load();
  return cap > 0 ? cap : std::numeric_limits<int64_t>::max();
}

bool force_int64_indices() { return options().int64_indices.load(); }

void record_index_width(int bytes) {
  (bytes == 4 ? counters().int32_choices : counters().int64_choices).fetch_add(1, std::memory_order_relaxed);
}

namespace {

// Sets the knobs and returns the previous ones, so a caller can restore them.
std::tuple<std::string, int64_t, bool> set_options(const std::string& schedule, int64_t max_blocks,
                                                   bool int64_indices) {
  TORCH_CHECK(max_blocks >= 0, "max_blocks must be >= 0 (0: no cap of the emulator's own), got ", max_blocks);
  const Schedule parsed = parse_schedule(schedule);
  Options& o = options();
  std::tuple<std::string, int64_t, bool> previous{schedule_name(static_cast<Schedule>(o.schedule.load())),
                                                  o.max_blocks.load(), o.int64_indices.load()};
  o.schedule.store(static_cast<int>(parsed));
  o.max_blocks.store(max_blocks);
  o.int64_indices.store(int64_indices);
  return previous;
}

std::tuple<std::string, int64_t, bool> get_options() {
  const Options& o = options();
  return {schedule_name(static_cast<Schedule>(o.schedule.load())), o.max_blocks.load(), o.int64_indices.load()};
}

// Counters since the library loaded: launches, blocks, threads, barriers passed, and index-width choices
// (cuda::with_index_type: one per kernel, or per group of kernels launched together) for int32 and for int64.
std::vector<int64_t> stats() {
  const Counters& c = counters();
  return {c.launches.load(), c.blocks.load(), c.threads.load(), c.barriers.load(), c.int32_choices.load(),
          c.int64_choices.load()};
}

}  // namespace

// The emulator's own ops, beside the kernels' schemas (registration.cpp) in the emulated op namespace.
FCN_FAST_LIBRARY_FRAGMENT(m) {
  m.def("_emulator_options(str schedule, int max_blocks, bool int64_indices) -> (str, int, bool)", &set_options);
  m.def("_emulator_get_options() -> (str, int, bool)", &get_options);
  m.def("_emulator_stats() -> int[]", &stats);
}

}  // namespace emu
}  // namespace fcn_fast
