"""Export: quantized variants, GGUF through llama.cpp, the Ollama Modelfile, publishing to the hub."""
