# Text stages: tokens + vocabulary, referral trees, BERT features, tag vectors.
