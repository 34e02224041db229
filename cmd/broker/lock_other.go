//go:build !unix

package main

import "errors"

// LockFile is the file `broker serve` would lock.
const LockFile = "serve.lock"

func lockDataDir(dir string) (release func(), err error) {
	return nil, errors.New("broker serve needs flock(2) to guard the data directory: run it on Linux or another Unix")
}
