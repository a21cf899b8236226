// Device-generic argument checks of latent_feedback_ (see latent_feedback.h); the kernels live in
// csrc/cpu/latent_feedback.cpp and csrc/cuda/latent_feedback.cu.
#include "latent_feedback.h"

#include <vector>

namespace coconut {

namespace {

FeedbackNorm parse_norm(c10::string_view norm) {
  if (norm == "none") return FeedbackNorm::kNone;
  if (norm == "layernorm") return FeedbackNorm::kLayerNorm;
  if (norm == "rmsnorm") return FeedbackNorm::kRMSNorm;
  COCONUT_CHECK(false, "norm must be \"none\", \"layernorm\" or \"rmsnorm\", got \"", std::string(norm), "\"");
  return FeedbackNorm::kNone;
}

void check_param(const std::optional<at::Tensor>& p, const at::Tensor& hidden, int64_t d, const char* name) {
  if (!p.has_value()) return;
  check_rank(*p, 1, name, "(d,)");
  COCONUT_CHECK(p->size(0) == d, name, " must have d = ", d, " elements (hidden's last dim), got ", p->size(0));
  check_same_device(*p, hidden, name, "hidden");
  COCONUT_CHECK(p->scalar_type() == hidden.scalar_type() || p->scalar_type() == at::kFloat, name,
                " must have hidden's dtype (", hidden.scalar_type(), ") or float32, got ", p->scalar_type());
}

void check_index(const at::Tensor& idx, const at::Tensor& hidden, int64_t n, const char* name) {
  check_rank(idx, 1, name, "(N,)");
  check_index_dtype(idx, name);
  check_same_device(idx, hidden, name, "hidden");
  COCONUT_CHECK(idx.size(0) == n, name, " must have N = ", n, " elements (dst_pos's length), got ", idx.size(0));
}

}  // namespace

FeedbackArgs check_feedback_args(const at::Tensor& embeds, const at::Tensor& hidden,
                                 const std::optional<at::Tensor>& batch_idx, const at::Tensor& dst_pos,
                                 const at::Tensor& src_pos, c10::string_view norm,
                                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                 double eps, const char* out_name) {
  FeedbackArgs a;
  a.norm = parse_norm(norm);
  a.batched = batch_idx.has_value();
  const char* layout = a.batched ? "(B, T, d) when batch_idx is given" : "(rows, d) when batch_idx is None";
  check_rank(embeds, a.batched ? 3 : 2, out_name, layout);
  check_rank(hidden, a.batched ? 3 : 2, "hidden", a.batched ? "(B, S, d) when batch_idx is given"
                                                           : "(rows, d) when batch_idx is None");
  check_float_dtype(hidden, "hidden");
  check_same_dtype(embeds, hidden, out_name, "hidden");
  check_same_device(embeds, hidden, out_name, "hidden");
  a.d = hidden.size(-1);
  COCONUT_CHECK(embeds.size(-1) == a.d, out_name, "'s last dim (", embeds.size(-1), ") must equal hidden's (", a.d,
                ")");
  COCONUT_CHECK(a.d >= 1, "hidden's last dim d must be >= 1, got ", a.d);
  if (a.batched) {
    COCONUT_CHECK(embeds.size(0) == hidden.size(0), out_name, " and hidden must have the same batch size B, got ",
                  embeds.size(0), " and ", hidden.size(0));
  }
  a.batch = a.batched ? hidden.size(0) : 1;
  a.t_len = embeds.size(a.batched ? 1 : 0);
  a.s_len = hidden.size(a.batched ? 1 : 0);
  a.n = dst_pos.dim() == 1 ? dst_pos.size(0) : -1;
  check_index(dst_pos, hidden, a.n, "dst_pos");
  check_index(src_pos, hidden, a.n, "src_pos");
  if (a.batched) check_index(*batch_idx, hidden, a.n, "batch_idx");

  if (a.norm == FeedbackNorm::kNone) {
    COCONUT_CHECK(!weight.has_value() && !bias.has_value(), "weight and bias must be None when norm=\"none\"");
  }
  COCONUT_CHECK(!(a.norm == FeedbackNorm::kRMSNorm && bias.has_value()),
                "bias must be None when norm=\"rmsnorm\" (RMSNorm has no bias)");
  check_param(weight, hidden, a.d, "weight");
  check_param(bias, hidden, a.d, "bias");
  COCONUT_CHECK(eps >= 0.0, "eps must be >= 0, got ", eps);
  return a;
}

void check_feedback_indices(const FeedbackArgs& a, const std::optional<at::Tensor>& batch_idx,
                            const at::Tensor& dst_pos, const at::Tensor& src_pos) {
  if (a.n == 0) return;
  auto host = [](const at::Tensor& t) { return t.to(at::kCPU, at::kLong).contiguous(); };
  const at::Tensor dst = host(dst_pos), src = host(src_pos);
  const at::Tensor bat = a.batched ? host(*batch_idx) : at::Tensor();
  const int64_t* dp = dst.data_ptr<int64_t>();
  const int64_t* sp = src.data_ptr<int64_t>();
  const int64_t* bp = a.batched ? bat.data_ptr<int64_t>() : nullptr;
  std::vector<int64_t> first(static_cast<size_t>(a.batch * a.t_len), -1);
  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t b = bp ? bp[i] : 0;
    if (bp) {
      COCONUT_CHECK(b >= 0 && b < a.batch, "batch_idx[", i, "] = ", b, " is out of range [0, ", a.batch, ")");
    }
    COCONUT_CHECK(dp[i] >= 0 && dp[i] < a.t_len, "dst_pos[", i, "] = ", dp[i], " is out of range [0, ", a.t_len,
                  ") (embeds' ", a.batched ? "T" : "rows", ")");
    COCONUT_CHECK(sp[i] >= 0 && sp[i] < a.s_len, "src_pos[", i, "] = ", sp[i], " is out of range [0, ", a.s_len,
                  ") (hidden's ", a.batched ? "S" : "rows", ")");
    int64_t& seen = first[static_cast<size_t>(b * a.t_len + dp[i])];
    COCONUT_CHECK(seen < 0, "duplicate destination: (batch_idx, dst_pos) entries ", seen, " and ", i,
                  " both write row (", b, ", ", dp[i], ") of embeds; destinations must be unique");
    seen = i;
  }
}

at::Tensor rows_view(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

}  // namespace coconut
