package main

import "io"

func cmdCompletion(args []string, stdout io.Writer) error { return nil }
