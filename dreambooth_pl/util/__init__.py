"""Small helpers every role uses: config errors, console noise, network checks, image files."""
