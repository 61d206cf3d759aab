package main

import (
	"errors"

	"github.com/flexnbd/flexnbd/nbd"
)

// exportFlags name and describe the export of serve and listen.
type exportFlags struct {
	ExportName  string `name:"export-name" placeholder:"NAME" help:"Name of the export: clients may ask for it or for the default export (\"\"); any other name is refused."`
	Description string `name:"description" placeholder:"TEXT" help:"Description clients are given with the export (nbdinfo shows it)."`
}

// check refuses what the handshake could not carry (a command line
// cannot hold a NUL).
func (f *exportFlags) check() error {
	if len(f.ExportName) > nbd.MaxStringLen || len(f.Description) > nbd.MaxStringLen {
		return errors.New("--export-name and --description are limited to 4096 bytes")
	}
	return nil
}
