/* Helpers of the threaded kernels in _cykernels.pyx: a thread pool, a spin barrier and a float32 GEMM over
   prepacked panels.

   Thread pool: `fastlstm_run_parallel(job, arg, parts)` runs job(arg, part, parts) for part = 0 .. parts-1,
   part 0 on the calling thread, the others on workers started on first use and kept for the process. A
   worker spins for FASTLSTM_SPIN_NS after each job, so that the next step of a stream finds it awake, then
   sleeps on a condition variable. OpenMP is not used: its runtime is shared with other libraries in the
   process (PyTorch brings one), which change how long its threads spin before sleeping, and waking a
   sleeping thread can take a scheduler tick (milliseconds) on a virtual machine. While one call holds the
   pool, a call from another thread runs its job on its own thread (parts = 1), and so do all calls for a
   while after a thread of a job waited too long for another (see "Contention" below).

   Spin barrier: the threads of one job that runs a whole time loop meet once per step (or per layer), a few
   microseconds apart. A sense-reversing counter costs a few hundred nanoseconds per meeting.

   Packed GEMM: y (rows, cols) = x (rows, k) @ W[:, k_offset:k_offset + k].T for W (cols, K) packed once
   as panels of FASTLSTM_PANEL columns: panel p is (K, FASTLSTM_PANEL) row-major and holds W[p*PANEL + j, kk]
   at [kk][j], so a tile streams its weights in order and reuses each loaded vector for FASTLSTM_TILE_ROWS
   rows of x. BLAS packs the same weights again on every call, which costs as much as the product itself
   at a recurrent step's small row counts. */
#ifndef FASTLSTM_PARALLEL_H
#define FASTLSTM_PARALLEL_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>
#if defined(__SSE2__) || defined(_M_X64)
#include <immintrin.h>
#define FASTLSTM_SPIN_PAUSE() _mm_pause()
#else
#define FASTLSTM_SPIN_PAUSE() ((void)0)
#endif

static inline long fastlstm_now_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec * 1000000000L + now.tv_nsec;
}

/* One round of a wait loop: pause for the first FASTLSTM_PAUSES_BEFORE_YIELD rounds (~5 us, longer than
   the threads of an even job wait for each other at a meeting), then give the core away each round: when
   another process holds a core, the thread being waited for may be queued behind this one on the same core
   (pausing 40 us per meeting made a 200-step sequence take 14 ms instead of 3 on one thread). */
#define FASTLSTM_PAUSES_BEFORE_YIELD 256
static inline void fastlstm_wait_round(unsigned* rounds) {
    if (*rounds < FASTLSTM_PAUSES_BEFORE_YIELD) {
        ++*rounds;
        FASTLSTM_SPIN_PAUSE();
    } else {
        sched_yield();
    }
}

/* Contention. The parts of a job are even, so a thread that has waited for the others of a job well past
   its pause phase, over FASTLSTM_CONTENTION_WAIT_NS and a quarter of the job's time so far, shows that
   some other process takes their cores: they may then lose them for a time slice at every meeting (a
   200-step sequence took 5-10x longer on two threads than on one while other processes ran, e.g. the
   OpenMP threads of another library spinning after their own work; with one busy process on the other
   core, a stream's step waited a whole time slice, milliseconds, for its descheduled partner about every
   time slice). From then on jobs run on their caller's thread alone for a while, then try threads again:
   5 ms at first; twice as long (up to a second) when contention comes back sooner after the last pause
   than that pause lasted, so that a neighbour that stays busy costs one contended try a second, not one
   every few milliseconds; 5 ms again after threads ran longer than the pause without it. Every wait of a
   job counts, its meetings and the caller's wait for the job's end, except those that may wait for a
   worker to wake up (which can take milliseconds on a virtual machine): the caller's first meeting, and
   its wait at the end of a job without meetings, when a worker was asleep as the job was posted. */
#define FASTLSTM_CONTENTION_WAIT_NS 200000L
#define FASTLSTM_CONTENTION_MIN_PAUSE_NS 5000000L
#define FASTLSTM_CONTENTION_MAX_PAUSE_NS 1000000000L
static atomic_long fastlstm_single_thread_until_ns;
static atomic_long fastlstm_contention_pause_ns = FASTLSTM_CONTENTION_MIN_PAUSE_NS;
static _Thread_local long fastlstm_job_start_ns;    /* when this thread started its current job */
static _Thread_local long fastlstm_job_yielded_ns;  /* its yielding waits in that job */
static _Thread_local int fastlstm_job_meetings;     /* the meetings it has passed in that job */
static _Thread_local int fastlstm_job_reported;     /* whether it has reported contention in that job */
static _Thread_local int fastlstm_job_wakes_worker;  /* its first wait may be for a sleeping worker to wake */

/* Reports contention seen at time `now`: jobs run on their caller's thread alone for the next pause. */
static inline void fastlstm_report_contention(long now) {
    /* Racing reports of two threads may both set a pause: either value is a fair one. */
    long last_pause = atomic_load_explicit(&fastlstm_contention_pause_ns, memory_order_relaxed);
    long last_end = atomic_load_explicit(&fastlstm_single_thread_until_ns, memory_order_relaxed);
    long pause = FASTLSTM_CONTENTION_MIN_PAUSE_NS;
    if (last_end != 0 && now - last_end < last_pause)
        pause = last_pause < FASTLSTM_CONTENTION_MAX_PAUSE_NS / 2 ? 2 * last_pause : FASTLSTM_CONTENTION_MAX_PAUSE_NS;
    atomic_store_explicit(&fastlstm_contention_pause_ns, pause, memory_order_relaxed);
    atomic_store_explicit(&fastlstm_single_thread_until_ns, now + pause, memory_order_relaxed);
}

static inline void fastlstm_job_started(int wakes_worker) {
    fastlstm_job_start_ns = fastlstm_now_ns();
    fastlstm_job_yielded_ns = 0;
    fastlstm_job_meetings = 0;
    fastlstm_job_reported = 0;
    fastlstm_job_wakes_worker = wakes_worker;
}

typedef struct {
    unsigned rounds;
    long yielding_since_ns;
} fastlstm_job_wait;

/* Adds the time since the last call of this wait's yielding phase to the job's, and reports contention. */
static inline void fastlstm_job_wait_account(fastlstm_job_wait* wait) {
    if (wait->rounds == FASTLSTM_PAUSES_BEFORE_YIELD) {
        long now = fastlstm_now_ns();
        int counts = fastlstm_job_meetings > 0 || !fastlstm_job_wakes_worker;
        if (counts && wait->yielding_since_ns != 0)
            fastlstm_job_yielded_ns += now - wait->yielding_since_ns;
        wait->yielding_since_ns = now;
        if (counts && !fastlstm_job_reported
                && fastlstm_job_yielded_ns > FASTLSTM_CONTENTION_WAIT_NS
                && 4 * fastlstm_job_yielded_ns > now - fastlstm_job_start_ns) {
            fastlstm_report_contention(now);
            fastlstm_job_reported = 1;
        }
    }
}

static inline void fastlstm_job_wait_round(fastlstm_job_wait* wait) {
    fastlstm_job_wait_account(wait);
    fastlstm_wait_round(&wait->rounds);
}

/* Short jobs (a stream's step) each wait less than FASTLSTM_CONTENTION_WAIT_NS for a partner that a busy
   neighbour delays, yet may lose as much as they gain at every step: the caller also sums its waits over
   its recent jobs, and reports contention when they pass the same bounds there. The sums are halved
   whenever the jobs' time passes FASTLSTM_RECENT_JOBS_NS, so that they weigh the last few milliseconds. */
#define FASTLSTM_RECENT_JOBS_NS 4000000L
static _Thread_local long fastlstm_recent_jobs_ns;
static _Thread_local long fastlstm_recent_yielded_ns;

static inline void fastlstm_recent_jobs_account(void) {
    long now = fastlstm_now_ns();
    if (fastlstm_job_reported) {
        fastlstm_recent_jobs_ns = fastlstm_recent_yielded_ns = 0;
        return;
    }
    fastlstm_recent_jobs_ns += now - fastlstm_job_start_ns;
    fastlstm_recent_yielded_ns += fastlstm_job_yielded_ns;
    if (fastlstm_recent_yielded_ns > FASTLSTM_CONTENTION_WAIT_NS
            && 4 * fastlstm_recent_yielded_ns > fastlstm_recent_jobs_ns) {
        fastlstm_report_contention(now);
        fastlstm_recent_jobs_ns = fastlstm_recent_yielded_ns = 0;
    } else if (fastlstm_recent_jobs_ns > FASTLSTM_RECENT_JOBS_NS) {
        fastlstm_recent_jobs_ns /= 2;
        fastlstm_recent_yielded_ns /= 2;
    }
}

/* ---------------------------------------------------------------------------------------------- pool */
#define FASTLSTM_MAX_THREADS 64
#define FASTLSTM_SPIN_NS 100000L  /* a worker's spin after a job: longer than a stream's gap between steps */

typedef void (*fastlstm_job)(void* arg, int part, int parts);

typedef struct {
    _Alignas(64) atomic_uint generation;  /* bumped when a job is posted */
    _Alignas(64) atomic_int unfinished;   /* workers that have not yet finished (or skipped) the posted job */
    _Alignas(64) atomic_int busy;         /* a call holds the pool */
    atomic_int sleepers;                  /* workers waiting on `wake` */
    fastlstm_job job;
    void* arg;
    int parts;
    int wakes_worker;                     /* a worker was asleep when the job was posted */
    int workers;                          /* started so far */
    unsigned spawn_generation;            /* the generation a worker started now waits to pass */
    pthread_mutex_t lock;
    pthread_cond_t wake;
} fastlstm_pool_state;

static fastlstm_pool_state fastlstm_pool = {
    .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
};

/* Worker `index` (1-based: part 0 is the caller's) runs part `index` of every job with more parts, and
   reports every job as finished, so that no worker can lag a job behind: the next job is posted only when
   all have reported, hence each worker sees every generation. */
static void* fastlstm_worker(void* index_ptr) {
    fastlstm_pool_state* pool = &fastlstm_pool;
    int index = (int)(long)index_ptr;
    unsigned seen = pool->spawn_generation;
    for (;;) {
        long spin_start = fastlstm_now_ns();
        unsigned spins = 0;

        /* Pauses only, no yield: a worker that gave its core away while idle would come back late to the
           next job, a time slice late when another process took the core. */
        while (atomic_load_explicit(&pool->generation, memory_order_acquire) == seen) {
            FASTLSTM_SPIN_PAUSE();
            if (++spins % 256 == 0 && fastlstm_now_ns() - spin_start > FASTLSTM_SPIN_NS) {
                /* Sleep. With the poster's seq_cst bump of `generation` followed by its load of `sleepers`,
                   and this increment followed by the re-check under the lock, one of the two sees the other. */
                pthread_mutex_lock(&pool->lock);
                atomic_fetch_add(&pool->sleepers, 1);
                while (atomic_load(&pool->generation) == seen)
                    pthread_cond_wait(&pool->wake, &pool->lock);
                atomic_fetch_sub(&pool->sleepers, 1);
                pthread_mutex_unlock(&pool->lock);
                break;
            }
        }
        seen++;
        fastlstm_job_started(pool->wakes_worker);
        if (index < pool->parts)
            pool->job(pool->arg, index, pool->parts);
        atomic_fetch_sub_explicit(&pool->unfinished, 1, memory_order_release);
    }
    return NULL;
}

/* In the child of a fork() only the forking thread exists: start the pool afresh. (The fork happened outside
   any run_parallel of the forking thread; one of another thread's is lost with that thread anyway.) */
static void fastlstm_pool_after_fork(void) {
    fastlstm_pool_state* pool = &fastlstm_pool;
    pool->workers = 0;
    atomic_store(&pool->busy, 0);
    atomic_store(&pool->sleepers, 0);
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->wake, NULL);
}

/* Run job(arg, part, parts) for every part < parts and return when all are done; see the top comment. */
static void fastlstm_run_parallel(fastlstm_job job, void* arg, int parts) {
    fastlstm_pool_state* pool = &fastlstm_pool;
    if (parts > FASTLSTM_MAX_THREADS)
        parts = FASTLSTM_MAX_THREADS;
    if (parts > 1 && fastlstm_now_ns() < atomic_load_explicit(&fastlstm_single_thread_until_ns,
                                                              memory_order_relaxed))
        parts = 1;
    if (parts <= 1 || atomic_exchange_explicit(&pool->busy, 1, memory_order_acquire)) {
        job(arg, 0, 1);
        return;
    }
    pool->spawn_generation = atomic_load(&pool->generation);
    static int fork_handler_registered = 0;  /* only ever touched while holding `busy` */
    if (!fork_handler_registered && pool->workers < parts - 1)
        fork_handler_registered = pthread_atfork(NULL, NULL, fastlstm_pool_after_fork) == 0;
    while (pool->workers < parts - 1) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, fastlstm_worker, (void*)(long)(pool->workers + 1)) != 0)
            break;
        pthread_detach(thread);
        pool->workers++;
    }
    if (parts > pool->workers + 1)
        parts = pool->workers + 1;
    int wakes_worker = 0;
    if (parts > 1) {
        pool->job = job;
        pool->arg = arg;
        pool->parts = parts;
        /* Read before the job is posted, for the workers; a worker that falls asleep just then is seen by
           the caller below, and at worst the others count its waking as contention once (a 5 ms pause). */
        wakes_worker = atomic_load(&pool->sleepers) > 0;
        pool->wakes_worker = wakes_worker;
        atomic_store_explicit(&pool->unfinished, pool->workers, memory_order_relaxed);
        atomic_fetch_add(&pool->generation, 1);  /* seq_cst: publishes the job, ordered before the next load */
        if (atomic_load(&pool->sleepers) > 0) {
            wakes_worker = 1;
            pthread_mutex_lock(&pool->lock);
            pthread_cond_broadcast(&pool->wake);
            pthread_mutex_unlock(&pool->lock);
        }
    }
    fastlstm_job_started(wakes_worker);
    job(arg, 0, parts);
    fastlstm_job_wait wait = {0, 0};
    while (atomic_load_explicit(&pool->unfinished, memory_order_acquire) > 0)
        fastlstm_job_wait_round(&wait);
    fastlstm_job_wait_account(&wait);
    atomic_store_explicit(&pool->busy, 0, memory_order_release);
    fastlstm_recent_jobs_account();
}

/* ---------------------------------------------------------------------------------------------- barrier */
typedef struct {
    _Alignas(64) atomic_int arrived;  /* threads at the current meeting */
    _Alignas(64) atomic_int sense;    /* flips when the last one arrives */
} fastlstm_barrier;

static inline void fastlstm_barrier_init(fastlstm_barrier* barrier) {
    atomic_init(&barrier->arrived, 0);
    atomic_init(&barrier->sense, 0);
}

/* Wait until all `team` threads arrive. `local_sense` is the caller's own flag, 0 before the first wait.
   Ordering: the last arrival's acq_rel increment has seen every other thread's release of its writes, and
   its release store of the new sense publishes them all to the acquire loads of the waiting threads. */
static inline void fastlstm_barrier_wait(fastlstm_barrier* barrier, int team, int* local_sense) {
    int sense = !*local_sense;
    *local_sense = sense;
    if (atomic_fetch_add_explicit(&barrier->arrived, 1, memory_order_acq_rel) == team - 1) {
        atomic_store_explicit(&barrier->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&barrier->sense, sense, memory_order_release);
    } else {
        fastlstm_job_wait wait = {0, 0};
        while (atomic_load_explicit(&barrier->sense, memory_order_acquire) != sense)
            fastlstm_job_wait_round(&wait);
        fastlstm_job_wait_account(&wait);  /* the last yield, during which the others ran */
    }
    fastlstm_job_meetings++;
}

/* ---------------------------------------------------------------------------------------------- packed GEMM */
#define FASTLSTM_PANEL 32      /* columns per panel: two 16-float vectors */
#if defined(__AVX512F__)
#define FASTLSTM_TILE_ROWS 8   /* 8 x 2 accumulators of 16 floats: 16 of the 32 vector registers */
#else
#define FASTLSTM_TILE_ROWS 4   /* 16 ymm registers without AVX-512: 4 x 2 x (2 halves) accumulators */
#endif

typedef float fastlstm_v16 __attribute__((vector_size(64)));

/* One tile: `tile_rows` (a constant once inlined) rows of x times one panel plus the row `start` (one panel
   wide), into y's first `cols` columns. */
static inline __attribute__((always_inline)) void fastlstm_tile(
        int tile_rows, long k, const float* x, long ldx, const float* panel, const float* start, float* y,
        long ldy, long cols) {
    fastlstm_v16 acc0[FASTLSTM_TILE_ROWS], acc1[FASTLSTM_TILE_ROWS], start0, start1;
    memcpy(&start0, start, sizeof start0);
    memcpy(&start1, start + 16, sizeof start1);
    for (int r = 0; r < tile_rows; r++) {
        acc0[r] = start0;
        acc1[r] = start1;
    }
    for (long kk = 0; kk < k; kk++) {
        fastlstm_v16 w0, w1;
        memcpy(&w0, panel + kk * FASTLSTM_PANEL, sizeof w0);
        memcpy(&w1, panel + kk * FASTLSTM_PANEL + 16, sizeof w1);
        for (int r = 0; r < tile_rows; r++) {
            float xv = x[r * ldx + kk];
            acc0[r] += w0 * xv;
            acc1[r] += w1 * xv;
        }
    }
    for (int r = 0; r < tile_rows; r++) {
        if (cols == FASTLSTM_PANEL) {
            memcpy(y + r * ldy, &acc0[r], sizeof acc0[r]);
            memcpy(y + r * ldy + 16, &acc1[r], sizeof acc1[r]);
        } else {  /* the last panel of a matrix whose column count is not a multiple of the panel */
            float full[FASTLSTM_PANEL];
            memcpy(full, &acc0[r], sizeof acc0[r]);
            memcpy(full + 16, &acc1[r], sizeof acc1[r]);
            memcpy(y + r * ldy, full, cols * sizeof(float));
        }
    }
}

static void fastlstm_tile_any(int tile_rows, long k, const float* x, long ldx, const float* panel,
                              const float* start, float* y, long ldy, long cols) {
    switch (tile_rows) {  /* one specialised copy per row count, the accumulators in registers */
#if FASTLSTM_TILE_ROWS > 4
    case 8: fastlstm_tile(8, k, x, ldx, panel, start, y, ldy, cols); break;
    case 7: fastlstm_tile(7, k, x, ldx, panel, start, y, ldy, cols); break;
    case 6: fastlstm_tile(6, k, x, ldx, panel, start, y, ldy, cols); break;
    case 5: fastlstm_tile(5, k, x, ldx, panel, start, y, ldy, cols); break;
#endif
    case 4: fastlstm_tile(4, k, x, ldx, panel, start, y, ldy, cols); break;
    case 3: fastlstm_tile(3, k, x, ldx, panel, start, y, ldy, cols); break;
    case 2: fastlstm_tile(2, k, x, ldx, panel, start, y, ldy, cols); break;
    default: fastlstm_tile(1, k, x, ldx, panel, start, y, ldy, cols); break;
    }
}

/* y (rows, cols) = bias + x (rows, k) @ W[:, k_offset : k_offset + k].T, W packed as described at the top
   with `packed_k` = K columns per panel; `bias` (cols,) may be NULL for none. Each panel is taken by every
   tile of rows in turn, so its weights come from memory once per call and from cache for the other tiles. */
static void fastlstm_packed_gemm(long rows, long cols, long k, const float* x, long ldx, const float* packed,
                                 long packed_k, long k_offset, const float* bias, float* y, long ldy) {
    for (long col = 0; col < cols; col += FASTLSTM_PANEL) {
        const float* panel = packed + (col / FASTLSTM_PANEL) * packed_k * FASTLSTM_PANEL
                             + k_offset * FASTLSTM_PANEL;
        long width = cols - col < FASTLSTM_PANEL ? cols - col : FASTLSTM_PANEL;
        float start[FASTLSTM_PANEL] = {0};
        if (bias != NULL)
            memcpy(start, bias + col, width * sizeof(float));
        for (long row = 0; row < rows; row += FASTLSTM_TILE_ROWS) {
            long tile_rows = rows - row < FASTLSTM_TILE_ROWS ? rows - row : FASTLSTM_TILE_ROWS;
            fastlstm_tile_any((int)tile_rows, k, x + row * ldx, ldx, panel, start, y + row * ldy + col, ldy,
                              width);
        }
    }
}

#endif
