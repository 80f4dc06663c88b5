"""Export of trained fsl_jax models to TensorFlow (SavedModel) and Core ML (.mlpackage)."""
