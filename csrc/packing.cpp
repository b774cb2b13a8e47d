// Packing helpers over plain integer arrays: cu_seqlens, position ids, first-fit-decreasing token-budget
// micro-batches and Karmarkar-Karp balanced partitions. Twins of the pure-Python fallbacks in
// ovr_kernels/packing.py: same algorithm, same tie-breaks, identical results (tests compare both).
// cu_seqlens / position ids trust their inputs (the wrappers validate them); FFD and KK check the lengths themselves,
// with the wrappers' ValueError messages, so the wrappers skip a Python pass over 64k lengths.
#include <algorithm>
#include <cstdint>
#include <queue>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "checks.h"

namespace ovr {

// lengths (n,) int64 -> cu (n+1,) int32, cu[0] = 0.
void cu_seqlens_from_lengths_cpu(const int64_t* lengths, int64_t n, int32_t* cu) {
  int64_t acc = 0;
  cu[0] = 0;
  for (int64_t i = 0; i < n; ++i) {
    acc += lengths[i];
    cu[i + 1] = static_cast<int32_t>(acc);
  }
}

// cu (num_seqs+1,) int32 -> pos (cu[num_seqs],) int64: 0..len-1 within each sequence.
void position_ids_cpu(const int32_t* cu, int64_t num_seqs, int64_t* pos) {
  for (int64_t b = 0; b < num_seqs; ++b) {
    for (int32_t t = cu[b]; t < cu[b + 1]; ++t) pos[t] = t - cu[b];
  }
}

// Each length must be in [0, max_len] (the wrappers pass these checks to C++ to skip a Python pass).
static void check_lengths(const int64_t* lengths, int64_t n, int64_t max_len) {
  for (int64_t i = 0; i < n; ++i) {
    OVR_CHECK(lengths[i] >= 0, "lengths[" << i << "] must be >= 0, got " << lengths[i]);
    OVR_CHECK(lengths[i] <= max_len, "sequence " << i << " has length " << lengths[i] << " > max_tokens=" << max_len);
  }
}

// First-fit decreasing: sequences by length descending (ties: lower index first), each into the lowest-numbered bin
// with room; bins in opening order, each bin's indices in insertion order. First fit is found in O(log n) with a
// max segment tree over the room left in every bin (unopened bins are empty, so the first unopened one is always a
// candidate). First fit never leaves two bins at most half full, so it opens fewer than 2 * total / max_tokens + 1
// bins: that bounds the tree.
std::vector<std::vector<int64_t>> ffd_microbatches_cpu(const int64_t* lengths, int64_t n, int64_t max_tokens) {
  check_lengths(lengths, n, max_tokens);
  std::vector<std::vector<int64_t>> bins;
  if (n == 0) return bins;
  // Order: length descending, ties by index ascending. A stable counting sort over lengths when max_tokens is
  // small next to n (the usual case: O(n + max_tokens)), else a comparison sort on (-length, index).
  std::vector<int64_t> order(n);
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += lengths[i];
  if (max_tokens <= 4 * n) {
    std::vector<int64_t> start(max_tokens + 2, 0);  // start[max_tokens - len + 1] counts length len
    for (int64_t i = 0; i < n; ++i) ++start[max_tokens - lengths[i] + 1];
    for (int64_t b = 1; b < max_tokens + 2; ++b) start[b] += start[b - 1];
    for (int64_t i = 0; i < n; ++i) order[start[max_tokens - lengths[i]]++] = i;
  } else {
    std::vector<std::pair<int64_t, int64_t>> keyed(n);
    for (int64_t i = 0; i < n; ++i) keyed[i] = {-lengths[i], i};
    std::sort(keyed.begin(), keyed.end());
    for (int64_t i = 0; i < n; ++i) order[i] = keyed[i].second;
  }
  const int64_t max_bins = std::min(n, 2 * (total / max_tokens) + 2);
  int64_t size = 1;
  while (size < max_bins) size <<= 1;
  std::vector<int64_t> tree(2 * size, max_tokens);  // tree[size + b] = room left in bin b
  for (const int64_t i : order) {
    const int64_t len = lengths[i];
    if (tree[1] < len) throw std::logic_error("ffd_microbatches: bin bound exceeded (bug)");
    int64_t node = 1;
    while (node < size) node = tree[2 * node] >= len ? 2 * node : 2 * node + 1;  // leftmost leaf with room
    const int64_t bin = node - size;
    if (bin == static_cast<int64_t>(bins.size())) bins.emplace_back();
    bins[bin].push_back(i);
    tree[node] -= len;
    for (node >>= 1; node >= 1; node >>= 1) tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);
  }
  return bins;
}

namespace {
// A part of a k-tuple: its load, smallest sequence index (orders equal loads) and a linked list of its indices
// (head/tail into a shared `next` array, so concatenating two parts is O(1)).
struct Part {
  int64_t sum;
  int64_t min_idx;
  int64_t head;
  int64_t tail;
};
bool part_before(const Part& a, const Part& b) {  // load descending, then smallest index
  return a.sum != b.sum ? a.sum > b.sum : a.min_idx < b.min_idx;
}
}  // namespace

// Karmarkar-Karp largest differencing into k parts. Every item starts as a k-tuple (w_i, 0, ..., 0); the two tuples
// with the largest spread (max - min load; ties: lower id first) are merged by pairing the heaviest part of one
// with the lightest of the other, and the merged tuple (id = next counter) goes back on the heap. A tuple stores
// only its non-empty parts (they sort before the empty ones, which have load 0 and no index), so memory is O(n)
// for any k. Every returned part is sorted ascending; parts come in load order.
// lengths (n,) >= 0; quadratic: a sequence weighs length^2 instead of length. Returns (parts, part loads).
std::pair<std::vector<std::vector<int64_t>>, std::vector<int64_t>> kk_partition_cpu(const int64_t* lengths, int64_t n,
                                                                                   int64_t k, bool quadratic) {
  std::vector<std::vector<int64_t>> out(k);
  std::vector<int64_t> loads(k, 0);
  std::vector<int64_t> w(n);
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    OVR_CHECK(lengths[i] >= 0, "lengths[" << i << "] must be >= 0, got " << lengths[i]);
    w[i] = lengths[i];
    const char* cost = quadratic ? "quadratic" : "tokens";
    OVR_CHECK(!quadratic || !__builtin_mul_overflow(lengths[i], lengths[i], &w[i]),
              "total " << cost << " cost overflows int64; lengths are too large for cost='" << cost << "'");
    OVR_CHECK(!__builtin_add_overflow(total, w[i], &total),
              "total " << cost << " cost overflows int64; lengths are too large for cost='" << cost << "'");
  }
  if (n == 0) return {out, loads};
  std::vector<int64_t> next(n, -1);
  // Tuple ids: 0..n-1 are the single items (implicit, never stored), n + m is the m-th merged tuple. Vectors of
  // consumed tuples are recycled so that the merge loop does not allocate once warm.
  std::vector<std::vector<Part>> merged_sets;
  merged_sets.reserve(n);
  std::vector<std::vector<Part>> spare;
  using Key = std::pair<int64_t, int64_t>;  // (spread, id): largest spread first, then smallest id
  auto cmp = [](const Key& a, const Key& b) { return a.first != b.first ? a.first < b.first : a.second > b.second; };
  std::vector<Key> storage;
  storage.reserve(n);
  for (int64_t i = 0; i < n; ++i) storage.push_back({k > 1 ? w[i] : 0, i});
  std::priority_queue<Key, std::vector<Key>, decltype(cmp)> heap(cmp, std::move(storage));
  Part single_a{}, single_b{};
  auto view = [&](int64_t id, Part& single) -> std::pair<const Part*, int64_t> {
    if (id < n) {
      single = Part{w[id], id, id, id};
      return {&single, 1};
    }
    const std::vector<Part>& v = merged_sets[id - n];
    return {v.data(), static_cast<int64_t>(v.size())};
  };
  auto recycle = [&](int64_t id) {
    if (id >= n) {
      spare.push_back(std::move(merged_sets[id - n]));
      spare.back().clear();
    }
  };
  while (heap.size() > 1) {
    const int64_t a = heap.top().second;
    heap.pop();
    const int64_t b = heap.top().second;
    heap.pop();
    const auto [pa, la] = view(a, single_a);
    const auto [pb, lb] = view(b, single_b);
    std::vector<Part> merged;
    if (!spare.empty()) {
      merged = std::move(spare.back());
      spare.pop_back();
    }
    merged.reserve(std::min(k, la + lb));
    for (int64_t j = 0; j < k; ++j) {  // heaviest of a with lightest of b; slots past a tuple's size are empty
      const bool has_x = j < la, has_y = k - 1 - j < lb;
      if (has_x && has_y) {
        const Part& x = pa[j];
        const Part& y = pb[k - 1 - j];
        next[x.tail] = y.head;
        merged.push_back(Part{x.sum + y.sum, std::min(x.min_idx, y.min_idx), x.head, y.tail});
      } else if (has_x) {
        merged.push_back(pa[j]);
      } else if (has_y) {
        merged.push_back(pb[k - 1 - j]);
      }
    }
    std::sort(merged.begin(), merged.end(), part_before);
    const int64_t lightest = static_cast<int64_t>(merged.size()) == k ? merged.back().sum : 0;
    const int64_t spread = merged.front().sum - lightest;
    recycle(a);
    recycle(b);
    merged_sets.push_back(std::move(merged));
    heap.push({spread, n + static_cast<int64_t>(merged_sets.size()) - 1});
  }
  Part single_final{};
  const auto [final_parts, num_final] = view(heap.top().second, single_final);
  for (int64_t j = 0; j < num_final; ++j) {
    for (int64_t i = final_parts[j].head; i != -1; i = next[i]) out[j].push_back(i);
    std::sort(out[j].begin(), out[j].end());
    loads[j] = final_parts[j].sum;
  }
  return {out, loads};
}

}  // namespace ovr
