//! Realistic synthetic batches (feature `synth`). Placeholder: being written.
