# Training and evaluation of every model: results/{model}/{dataset}/{model.pt,train_log.csv,metrics.json}.
