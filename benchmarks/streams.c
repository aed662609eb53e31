/* AdamW's memory traffic outside XLA: the update as one fused loop, as a C compiler makes
 * it (benchmarks/bench_bandwidth.py builds this with the system `cc` and runs it beside
 * the XLA contenders, interleaved).
 *
 * usage: streams N N_COPY   (N parameters; the copy moves N_COPY floats)
 * Reads one kernel name a line on stdin, runs it once on OpenMP's threads, answers "ok":
 *   memcpy        dst ← src, N_COPY floats, one memcpy per thread
 *   same_streams  p, m, v ← p + g, m + g, v + g             (28 B a parameter)
 *   adamw         m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g²,
 *                 p ← p − η(m̂/(√v̂ + ε) + λp)               (28 B a parameter)
 */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long n, n_copy;
static float *p, *g, *m, *v, *src, *dst;

static float *alloc(long count, float value) {
  float *a = aligned_alloc(64, ((count * sizeof(float) + 63) / 64) * 64);
  if (!a) {
    fprintf(stderr, "out of memory\n");
    exit(1);
  }
#pragma omp parallel for schedule(static) /* first touch by the thread that uses it */
  for (long i = 0; i < count; i++) a[i] = value;
  return a;
}

static void k_memcpy(void) {
#pragma omp parallel
  {
    long t = omp_get_thread_num(), T = omp_get_num_threads();
    long a = n_copy * t / T, b = n_copy * (t + 1) / T;
    memcpy(dst + a, src + a, (size_t)(b - a) * sizeof(float));
  }
}

static void k_same_streams(void) {
#pragma omp parallel for simd schedule(static)
  for (long i = 0; i < n; i++) {
    float x = g[i];
    p[i] += x;
    m[i] += x;
    v[i] += x;
  }
}

static void k_adamw(void) {
  const float b1 = 0.9f, b2 = 0.999f, lr = 1e-3f, wd = 1e-4f, eps = 1e-8f;
  const float c1 = 1.0f / (1.0f - b1), c2 = 1.0f / (1.0f - b2); /* bias correction, step 1 */
#pragma omp parallel for simd schedule(static)
  for (long i = 0; i < n; i++) {
    float x = g[i], w = p[i];
    float mm = b1 * m[i] + (1.0f - b1) * x;
    float vv = b2 * v[i] + (1.0f - b2) * x * x;
    m[i] = mm;
    v[i] = vv;
    p[i] = w - lr * (mm * c1 / (sqrtf(vv * c2) + eps) + wd * w);
  }
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: streams N N_COPY\n");
    return 2;
  }
  n = atol(argv[1]);
  n_copy = atol(argv[2]);
  p = alloc(n, 0.01f);
  g = alloc(n, 1e-3f);
  m = alloc(n, 0.0f);
  v = alloc(n, 0.0f);
  src = alloc(n_copy, 1.0f);
  dst = alloc(n_copy, 0.0f);
  printf("ready %d\n", omp_get_max_threads());
  fflush(stdout);
  char line[64];
  while (fgets(line, sizeof line, stdin)) {
    line[strcspn(line, "\n")] = 0;
    if (!strcmp(line, "memcpy")) k_memcpy();
    else if (!strcmp(line, "same_streams")) k_same_streams();
    else if (!strcmp(line, "adamw")) k_adamw();
    else {
      fprintf(stderr, "unknown kernel: %s\n", line);
      return 2;
    }
    puts("ok");
    fflush(stdout);
  }
  return 0;
}
