"""Models this project builds or unpacks itself: tiny random ones for tests, the embedded Gemma-3-270M."""
