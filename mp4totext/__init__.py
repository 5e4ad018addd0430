"""mp4totext: self-hosted transcription backend."""
