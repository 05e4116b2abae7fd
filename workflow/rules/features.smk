# Region features: detector training on shapes, bottom-up extraction (sharded), feature import.
