//go:build !race

package main

// raceEnabled makes the server binary under test race-instrumented too.
const raceEnabled = false
