package interop

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
)

// TestFioVerify writes with fio's nbd engine at a high queue depth, then
// has fio read everything back and check each block's checksum. With
// numjobs each job opens its own connection on its own region, so the
// connections write in parallel. Runs are bounded by size, not time.
func TestFioVerify(t *testing.T) {
	fio := testserver.Tool(t, "fio")
	const exportSize = 256 << 20
	tests := []struct {
		name    string
		numjobs int
		size    int64 // per job
		iodepth int
		args    []string
	}{
		{"one connection qd32 mixed sizes", 1, 64 << 20, 32, []string{"--bsrange=4k-128k"}},
		{"four connections", 4, 48 << 20, 16, []string{"--bs=16k", "--offset_increment=64m"}},
		{"sequential large blocks", 1, 96 << 20, 8, []string{"--rw=write", "--bs=1m", "--offset=128m"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			inst := testserver.Start(t, testserver.Options{Size: exportSize})
			report := filepath.Join(t.TempDir(), "fio.json")
			args := []string{
				"--name=verify", "--ioengine=nbd", "--uri=" + inst.URI(),
				"--rw=randwrite", "--iodepth=" + fmt.Sprint(tc.iodepth),
				"--numjobs=" + fmt.Sprint(tc.numjobs), "--size=" + fmt.Sprint(tc.size),
				"--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
				"--output-format=json", "--output=" + report,
			}
			// Later options override earlier ones, so a case can change rw.
			out := testserver.Run(t, toolTimeout, fio, append(args, tc.args...)...)
			raw, err := os.ReadFile(report)
			require.NoError(t, err)
			var res struct {
				Jobs []struct {
					Error int `json:"error"`
					Write struct {
						Bytes int64 `json:"io_bytes"`
					} `json:"write"`
					Read struct {
						Bytes int64 `json:"io_bytes"`
					} `json:"read"`
				} `json:"jobs"`
			}
			require.NoError(t, json.Unmarshal(raw, &res), "%s\n%s", out, raw)
			require.Len(t, res.Jobs, tc.numjobs)
			for i, j := range res.Jobs {
				assert.Zero(t, j.Error, "job %d error", i)
				assert.Equal(t, tc.size, j.Write.Bytes, "job %d wrote its whole region", i)
				assert.Equal(t, tc.size, j.Read.Bytes, "job %d verified its whole region", i)
			}
			assert.GreaterOrEqual(t, inst.Server.Stats().ConnectionsSeen, uint64(tc.numjobs))
		})
	}
}
