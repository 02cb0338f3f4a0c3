// Go net/http clients with keep-alive connection pools, as Go services use them: `workers`
// goroutines, each with its own http.Client (so each keeps one connection), send GET requests
// to `target` (at an optional fifth argument's path, default "/") until `seconds` pass,
// pausing `every` seconds between requests. Prints
// {"ok": N, "failed": N, "errors": [...]} as JSON. Only the standard library, so it builds
// with any Go.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"
)

func main() {
	if len(os.Args) != 5 && len(os.Args) != 6 {
		fmt.Fprintln(os.Stderr, "usage: pooled <host:port> <workers> <seconds> <every-seconds> [path]")
		os.Exit(2)
	}
	target := os.Args[1]
	path := "/"
	if len(os.Args) == 6 {
		path = os.Args[5]
	}
	workers, err1 := strconv.Atoi(os.Args[2])
	seconds, err2 := strconv.ParseFloat(os.Args[3], 64)
	every, err3 := strconv.ParseFloat(os.Args[4], 64)
	if err1 != nil || err2 != nil || err3 != nil || workers < 1 {
		fmt.Fprintln(os.Stderr, "pooled: bad arguments")
		os.Exit(2)
	}
	deadline := time.Now().Add(time.Duration(seconds * float64(time.Second)))
	var mu sync.Mutex
	ok, failed := 0, 0
	errors := []string{}
	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			transport := &http.Transport{MaxIdleConnsPerHost: 1, IdleConnTimeout: 90 * time.Second}
			client := &http.Client{Transport: transport, Timeout: 5 * time.Second}
			for time.Now().Before(deadline) {
				resp, err := client.Get("http://" + target + path)
				if err == nil {
					_, err = io.ReadAll(resp.Body)
					resp.Body.Close()
				}
				mu.Lock()
				if err != nil {
					failed++
					if len(errors) < 5 {
						errors = append(errors, err.Error())
					}
				} else {
					ok++
				}
				mu.Unlock()
				time.Sleep(time.Duration(every * float64(time.Second)))
			}
		}()
	}
	wg.Wait()
	out, _ := json.Marshal(map[string]interface{}{"ok": ok, "failed": failed, "errors": errors})
	fmt.Println(string(out))
}
