// Command gotmpl renders an Ollama Modelfile TEMPLATE with Go's text/template, the engine Ollama uses.
//
// Input (stdin, JSON): {"template": "...", "data": {...}}. The data mirrors what Ollama's template package
// (template/template.go, Execute) passes to a chat template: System, Messages (pointers to structs with Role,
// Content, Thinking, Images, ToolCalls, ToolName, ToolCallID; no JSON tags), Tools, Prompt, Response, Suffix,
// Think, IsThinkSet. Tool-call arguments are a plain map, as Ollama hands them to templates since #13636
// (templateArgs): a template can range over them (keys in sorted order), and they print as compact JSON with
// sorted keys. Tool definitions are decoded into structs shaped like Ollama's api.Tool, so they print in its field
// order (see Tool below), not the caller's. The template is parsed with Option("missingkey=zero") and Ollama's
// functions (json, currentDate, yesterdayDate). The rendered text goes to stdout.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"text/template"
	"time"
)

// templateArgs are a tool call's arguments as Ollama's templates see them: a map (rangeable, sorted keys) that
// prints as compact JSON.
type templateArgs map[string]any

func (a templateArgs) String() string {
	if a == nil {
		return "{}"
	}
	b, _ := json.Marshal(map[string]any(a))
	return string(b)
}

// Input side: a message as the chat request carries it (Ollama's api.Message JSON).
type toolCallIn struct {
	ID       string `json:"id"`
	Function struct {
		Index     int          `json:"index"`
		Name      string       `json:"name"`
		Arguments templateArgs `json:"arguments"`
	} `json:"function"`
}

type messageIn struct {
	Role       string       `json:"role"`
	Content    string       `json:"content"`
	Thinking   string       `json:"thinking"`
	ToolCalls  []toolCallIn `json:"tool_calls"`
	ToolName   string       `json:"tool_name"`
	ToolCallID string       `json:"tool_call_id"`
}

// Template side: what Ollama's template package (template/template.go, templateMessage and templateToolCall) puts
// in .Messages: pointers to structs without JSON tags, so `json` prints Go field names.
type ToolCallFunction struct {
	Index     int
	Name      string
	Arguments templateArgs
}

type ToolCall struct {
	ID       string
	Function ToolCallFunction
}

type Message struct {
	Role       string
	Content    string
	Thinking   string
	Images     [][]byte
	ToolCalls  []ToolCall
	ToolName   string
	ToolCallID string
}

func templateMessages(in []messageIn) []*Message {
	if in == nil {
		return nil
	}
	out := make([]*Message, len(in))
	for i, m := range in {
		var calls []ToolCall
		for _, c := range m.ToolCalls {
			calls = append(calls, ToolCall{ID: c.ID, Function: ToolCallFunction(c.Function)})
		}
		out[i] = &Message{Role: m.Role, Content: m.Content, Thinking: m.Thinking, ToolCalls: calls,
			ToolName: m.ToolName, ToolCallID: m.ToolCallID}
	}
	return out
}

// Tool definitions. Ollama decodes the request's tools into its api.Tool structs (api/types.go) and hands a
// TEMPLATE a copy whose parameter properties are a plain map (template/template.go, templateTool). So what a
// TEMPLATE prints is the structs' JSON: fields in struct order, keys Ollama does not know dropped, the parameters'
// property names in sorted order (map), a nested property's own properties in the caller's order (Ollama keeps
// those in an insertion-ordered map), and free-form values (items, $defs, enum) as decoded JSON (maps: sorted).

// propertyType is a JSON Schema type: a string or a list of them; one prints as a string.
type propertyType []string

func (p *propertyType) UnmarshalJSON(b []byte) error {
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		*p = propertyType{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return err
	}
	*p = many
	return nil
}

func (p propertyType) MarshalJSON() ([]byte, error) {
	if len(p) == 1 {
		return json.Marshal(p[0])
	}
	return json.Marshal([]string(p))
}

func (p propertyType) String() string {
	switch len(p) {
	case 0:
		return ""
	case 1:
		return p[0]
	}
	return fmt.Sprintf("%v", []string(p))
}

// ToolProperty is one parameter's schema, with the fields (and JSON names, order, omitempty) of Ollama's.
type ToolProperty struct {
	AnyOf       []ToolProperty `json:"anyOf,omitempty"`
	Type        propertyType   `json:"type,omitempty"`
	Items       any            `json:"items,omitempty"`
	Description string         `json:"description,omitempty"`
	Enum        []any          `json:"enum,omitempty"`
	Properties  *orderedProps  `json:"properties,omitempty"`
	Required    []string       `json:"required,omitempty"`
}

// orderedProps are nested properties, kept and printed in the order they were given.
type orderedProps struct {
	keys []string
	vals map[string]ToolProperty
}

func (o *orderedProps) UnmarshalJSON(b []byte) error {
	o.keys, o.vals = nil, map[string]ToolProperty{}
	dec := json.NewDecoder(bytes.NewReader(b))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return fmt.Errorf("properties must be a JSON object")
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key := tok.(string)
		var p ToolProperty
		if err := dec.Decode(&p); err != nil {
			return err
		}
		if _, seen := o.vals[key]; !seen {
			o.keys = append(o.keys, key)
		}
		o.vals[key] = p
	}
	_, err := dec.Token()
	return err
}

func (o orderedProps) MarshalJSON() ([]byte, error) {
	var buf bytes.Buffer
	buf.WriteByte('{')
	for i, k := range o.keys {
		if i > 0 {
			buf.WriteByte(',')
		}
		kb, _ := json.Marshal(k)
		vb, err := json.Marshal(o.vals[k])
		if err != nil {
			return nil, err
		}
		buf.Write(kb)
		buf.WriteByte(':')
		buf.Write(vb)
	}
	buf.WriteByte('}')
	return buf.Bytes(), nil
}

// templateProperties are a function's parameters as a TEMPLATE ranges over them (sorted names).
type templateProperties map[string]ToolProperty

func (p templateProperties) String() string {
	if p == nil {
		return "{}"
	}
	b, _ := json.Marshal(map[string]ToolProperty(p))
	return string(b)
}

type ToolFunctionParameters struct {
	Type       string             `json:"type"`
	Defs       any                `json:"$defs,omitempty"`
	Items      any                `json:"items,omitempty"`
	Required   []string           `json:"required,omitempty"`
	Properties templateProperties `json:"properties"`
}

// ToolFunction prints "description" even when empty: the template copy has no omitempty there (the API's has).
type ToolFunction struct {
	Name        string                 `json:"name"`
	Description string                 `json:"description"`
	Parameters  ToolFunctionParameters `json:"parameters"`
}

type Tool struct {
	Type     string       `json:"type"`
	Items    any          `json:"items,omitempty"`
	Function ToolFunction `json:"function"`
}

func (t Tool) String() string { b, _ := json.Marshal(t); return string(b) }

// Tools is .Tools: a list that prints as compact JSON.
type Tools []Tool

func (t Tools) String() string { b, _ := json.Marshal(t); return string(b) }

type Input struct {
	Template string `json:"template"`
	Now      string `json:"now,omitempty"` // YYYY-MM-DD for currentDate (tests); empty: today, as Ollama does
	Data     struct {
		System     string      `json:"System"`
		Messages   []messageIn `json:"Messages"`
		Tools      Tools       `json:"Tools"`
		Prompt     string      `json:"Prompt"`
		Response   string      `json:"Response"`
		Suffix     string      `json:"Suffix"`
		Think      bool        `json:"Think"`
		IsThinkSet bool        `json:"IsThinkSet"`
	} `json:"data"`
}

// funcs are Ollama's template functions: json, currentDate and yesterdayDate (YYYY-MM-DD, the format argument is
// ignored as in Ollama). toTypeScriptType is not provided (no family TEMPLATE uses it).
func funcs(now time.Time) template.FuncMap {
	return template.FuncMap{
		"json": func(v any) string {
			b, _ := json.Marshal(v)
			return string(b)
		},
		"currentDate":   func(args ...string) string { return now.Format("2006-01-02") },
		"yesterdayDate": func(args ...string) string { return now.AddDate(0, 0, -1).Format("2006-01-02") },
	}
}

// render parses and executes one template; errors carry the stage that failed.
func render(input Input) (string, error) {
	now := time.Now()
	if input.Now != "" {
		t, err := time.Parse("2006-01-02", input.Now)
		if err != nil {
			return "", fmt.Errorf("bad now %q: %w", input.Now, err)
		}
		now = t
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs(now)).Parse(input.Template)
	if err != nil {
		return "", fmt.Errorf("template parse error: %w", err)
	}
	d := input.Data
	tools := d.Tools
	if len(tools) == 0 {
		tools = nil // a request without tools: Ollama passes a nil list (false, prints as null)
	}
	data := map[string]any{
		"System":     d.System,
		"Messages":   templateMessages(d.Messages),
		"Tools":      tools,
		"Prompt":     d.Prompt,
		"Response":   d.Response,
		"Suffix":     d.Suffix,
		"Think":      d.Think,
		"IsThinkSet": d.IsThinkSet,
	}
	var out bytes.Buffer
	if err := tmpl.Execute(&out, data); err != nil {
		return "", fmt.Errorf("template execute error: %w", err)
	}
	return out.String(), nil
}

type result struct {
	Out string `json:"out"`
	Err string `json:"err,omitempty"`
}

// main reads one input object (writes the text) or a JSON array of them (writes a JSON array of results).
func main() {
	in, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "read stdin:", err)
		os.Exit(1)
	}
	trimmed := bytes.TrimSpace(in)
	if len(trimmed) > 0 && trimmed[0] == '[' {
		var inputs []Input
		if err := json.Unmarshal(trimmed, &inputs); err != nil {
			fmt.Fprintln(os.Stderr, "bad input JSON:", err)
			os.Exit(1)
		}
		results := make([]result, len(inputs))
		for i, input := range inputs {
			out, err := render(input)
			results[i] = result{Out: out}
			if err != nil {
				results[i].Err = err.Error()
			}
		}
		enc := json.NewEncoder(os.Stdout)
		enc.SetEscapeHTML(false)
		if err := enc.Encode(results); err != nil {
			os.Exit(1)
		}
		return
	}
	var input Input
	if err := json.Unmarshal(trimmed, &input); err != nil {
		fmt.Fprintln(os.Stderr, "bad input JSON:", err)
		os.Exit(1)
	}
	out, err := render(input)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	}
	os.Stdout.WriteString(out)
}
